"""Named sweeps for ``python -m sfd_jax.sweep --config=configs/sfd_xl.py --sweep=NAME``.

A sweep is plain data (this file imports nothing from ``sfd_jax``): a dict with

* ``"product"``: ``{field: [values, ...], ...}``: every combination, the first field
  varying slowest;
* ``"list"``: ``[{field: value, ...}, ...]``: explicit runs;
* both: every listed run combined with every grid point;
* ``"base"`` (optional): ``{field: value}`` applied to every run (not part of run names);
* ``"description"`` (optional).

Fields are dotted config paths (``objective.delta_t``). Each run trains in
``<workdir-root>/<sweep>/<run name>``, the name coming from the swept values
(``objective.delta_t=0.3`` → ``delta_t-0.3``; see ``sfd_jax.sweep.run_name``).
"""

# docs/method.md §11.4: FID-50K against Δt, 0 = synchronous joint denoising (one clock),
# 1 = fully sequential; optimum at 0.3. The figure does not state model, steps or guidance.
DELTA_T_FIGURE = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
DELTA_T_COARSE = [0.0, 0.1, 0.3, 0.5, 1.0]
# Table 1 compares models at 400K steps (batch 256); ablations use that budget here.
ABLATION_STEPS = 400_000

SWEEPS = {
    "delta_t": {
        "description": "Δt ablation of method.md §11.4 (every point of the figure), 400K steps",
        "product": {"objective.delta_t": DELTA_T_FIGURE},
        "base": {"num_train_steps": ABLATION_STEPS},
    },
    "delta_t_coarse": {
        "description": "Δt ∈ {0, 0.1, 0.3, 0.5, 1}: the shape of the §11.4 curve, 400K steps",
        "product": {"objective.delta_t": DELTA_T_COARSE},
        "base": {"num_train_steps": ABLATION_STEPS},
    },
    "delta_t_x_size": {
        "description": "coarse Δt ablation for each of B, L, XL (Table 1 sizes), 400K steps",
        "product": {"model.variant": ["B", "L", "XL"], "objective.delta_t": DELTA_T_COARSE},
        "base": {"num_train_steps": ABLATION_STEPS},
    },
    "semantic_weight": {
        "description": "weight of the semantic-channel MSE (reference 2.0; the paper's "
                       "ablation of it is not available, docs/method.md §11.6)",
        "product": {"objective.semantic_weight": [0.5, 1.0, 2.0, 4.0]},
        "base": {"num_train_steps": ABLATION_STEPS},
    },
    "model_size": {
        "description": "SFD at each LightningDiT size of Table 1 (+ XXL), 400K steps",
        "product": {"model.variant": ["B", "L", "XL", "XXL"]},
        "base": {"num_train_steps": ABLATION_STEPS},
    },
    "repa": {
        "description": "REPA off / cosine (original recipe) / cos+mse at 0.5 (80ep recipe)",
        "list": [
            {"objective.use_repa": False},
            {"objective.repa_mode": "cos", "objective.repa_weight": 1.0},
            {"objective.repa_mode": "cos_mse", "objective.repa_weight": 0.5},
        ],
        "base": {"num_train_steps": ABLATION_STEPS},
    },
}


def get_sweep(name: str) -> dict:
  """The sweep called ``name``; an unknown name is an error listing the known ones."""
  if name not in SWEEPS:
    raise KeyError(f"unknown sweep {name!r}; configs/sweeps.py defines: {', '.join(SWEEPS)}")
  return SWEEPS[name]
