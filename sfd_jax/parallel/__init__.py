"""Device mesh, logical-axis rules and shardings."""
from sfd_jax.parallel.sharding import (BATCH_AXES, DEFAULT_RULES, MESH_AXES, ShardingError,
                                       batch_devices, batch_sharding, check_batch,
                                       format_sharding_table, logical_to_mesh, make_mesh,
                                       replicated, sharding_table, tree_shardings)

__all__ = ["BATCH_AXES", "DEFAULT_RULES", "MESH_AXES", "ShardingError", "batch_devices",
           "batch_sharding", "check_batch", "format_sharding_table", "logical_to_mesh",
           "make_mesh", "replicated", "sharding_table", "tree_shardings"]
