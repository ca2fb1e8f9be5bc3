"""The prose of docs/options.md around the generated tables (``sfd_jax.core.options``).

``NOTES["<family>:<section>"]`` follows the table of that section (``"<family>:intro"``:
before the family's tables), and only when the section is on the page; ``NOTES["converters"]``
ends the page. Lines of Markdown.
"""

NOTES: dict[str, list[str]] = {
    "sfd:model": [
        "`use_qknorm`, `use_swiglu`, `use_rope`, `use_rmsnorm` (all True) and `wo_shift` "
        "(False) are the reference LightningDiT's switches. Off, they become what the "
        "reference builds instead: LayerNorm without affine parameters (eps 1e-6) instead "
        "of RMSNorm (and a LayerNorm with weight and bias, eps 1e-5, as QK-norm), no "
        "QK-norm, the timm GELU (tanh) MLP of width mlp_ratio·D instead of SwiGLU, no RoPE "
        "(the absolute sin-cos table stays), adaLN without shifts. `in_channels=32, "
        "semantic_chans=0, objective.delta_t=0` is the texture-only LightningDiT (one "
        "timestep embedder). Checked against the reference module "
        "(`tests/fixtures/lightningdit_variants.npz`). This covers LightningDiT's released "
        "ImageNet-256 models (XL/1, `use_qknorm: false`, SwiGLU, RoPE, RMSNorm, `in_chans: "
        "32`, no REPA); they were trained on the VA-VAE latent, not on SFD's texture "
        "latent. Not covered: `learn_sigma=True`.",
        "",
        "`attention_impl`: `\"\"`/`auto` picks cuDNN fused attention on sm80+ GPUs in "
        "bf16/fp16 with head_dim a multiple of 8 and ≤ 128, the heads-major XLA "
        "formulation `xla_heads` on CPUs and jax.nn's XLA path elsewhere "
        "(`sfd_jax/models/attention.py`).",
    ],
    "sfd:objective": [
        "Learned clocks and other schedules: `config.schedule` below and docs/clocks.md.",
    ],
    "sfd:schedule": [
        "A `config.schedule` section (absent by default: SFD's clocks from "
        "`objective.delta_t`) names the latent parts and gives each its clock; which "
        "fields each clock family takes, and examples, are in docs/clocks.md. "
        "`<part>` is the part's name (e.g. `texture`, `semantic`).",
    ],
    "sfd:optimizer": [
        "`accumulate_steps`: the noise, times and label dropout of the whole batch are "
        "drawn first, so the update equals one step on the whole batch within float32 "
        "rounding (tested on a data×fsdp mesh) with the activation memory of one "
        "micro-batch.",
    ],
    "sfd:data": [
        "`normalize=False` is an SD-VAE-style setup with a fixed multiplier (e.g. "
        "`latent_multiplier=0.18215`): latents are used as stored, times the multiplier, "
        "and decoding divides by it. REPA targets as `float16` halve the per-step host "
        "batch and are exact: the loss upcasts to float32, so training is bit-identical "
        "to `float32` (the reference's).",
    ],
    "sfd:validation": [
        "The validation loss (the SFD loss without label dropout, normalised with the "
        "training statistics, no flip) goes to TensorBoard as `val/loss` (mean over the "
        "times), `val/loss_t<t>` and `val/mse_t<t>`; clocks τ = t·(1 + Δt).",
    ],
    "sfd:sample": [
        "`sample` and `train_eval` go through `sfd_jax.diffusion.generation."
        "SamplingOptions` (the same fields; `train_eval` has no autoguidance and no "
        "checkpoint steps). The defaults are the paper's protocol.",
        "",
        "- `labels`: `balanced` gives class i·K//N to index i (50 per class for 50k); "
        "`random` is deterministic per index for any batch or device count (the "
        "reference's default without `balanced_sampling` draws with torch, so its labels "
        "cannot be reproduced); `unconditional` needs a model trained with label dropout. "
        "`samples/labels_<N>.npy` records the labels in index order.",
        "- `num_steps`: the grid is `torch.linspace(0, 1 + Δt, n)` bit for bit (FMA "
        "rounding as torch's AVX2/AVX-512 CPU kernel).",
        "- `cfg_interval_start` / `cfg_interval_end`: the reference's `cfg_interval_start`"
        "; the end is an upper bound as REPA's guidance window (REPA's t runs from noise "
        "= 1, so its `[low, high]` is `[1 − high, 1 − low]` here).",
        "- `compiler_options` (set in a config file: `c.sample.compiler_options."
        "xla_backend_optimization_level = 0`). Empty: on the CPU backend, Eigen dots "
        "instead of XLA:CPU's YNNPACK fusions (`xla_cpu_experimental_ynn_fusion_type=\"\"`"
        ", measured 25–30 % faster for sampling and decoding, docs/benchmarks.md); no "
        "options elsewhere.",
        "- `checkpoint_step`, `guide_step`: with a training workdir as `checkpoint` / "
        "`guide_checkpoint`, e.g. the paper's 70K or 120K B/1 guide from one guide run; an "
        "error for a converted folder.",
        "",
        "```bash",
        "python main.py --config=configs/sfd_xl.py --mode=sample --workdir=runs/xl_ag \\",
        "  --config.sample.checkpoint=ckpt/sfd_xl --config.sample.guide_checkpoint=runs/guide_b \\",
        "  --config.sample.guide_step=70000 --config.sample.scale=1.5 \\",
        "  --config.sample.cfg_scale_sem=1.2 --config.sample.labels=random",
        "```",
    ],
    "sfd:eval": [
        "`samples_npz` scores an existing ADM-format `.npz` (uint8 `arr_0` [N, H, W, 3], "
        "e.g. one written by the reference's `shuffle_gen_images.py` or by an earlier run) "
        "without loading a model (`--mode=eval` with `inception` and `reference_npz` set); "
        "the metrics are those `--mode=eval` computes on its own samples.",
    ],
    "converters": [
        "## Converters",
        "",
        "- All `.pt` / `.pth` / `.ckpt` files are read **without PyTorch and without "
        "running code from the file** (`sfd_jax.core.safe_pickle`): tensors and storages "
        "are rebuilt from an allow-list; any other object in the file (the OmegaConf "
        "`DictConfig` the reference's `train.py` saves next to `model` / `ema` / `opt`, an "
        "`argparse.Namespace`, optimizer state) becomes an inert stand-in whose "
        "constructor, `__reduce__` callable and `__setstate__` are never called; a file "
        "referring to code-running globals (`os.system`, `subprocess`, `builtins.exec`, …) "
        "is refused. `safe_pickle.to_plain(obj[\"config\"])` gives the stored config as "
        "plain dicts.",
        "- `python -m sfd_jax.convert.lightning_dit`: `--variant custom` (sizes from "
        "`--config-json`), `--config-json` with sfd_jax field names or the reference's (a "
        "training YAML's `model` section with `model_type`, `in_chans`, `use_qknorm`, …, "
        "or the constructor's keyword arguments — absent switches are then *off*, the "
        "constructor's defaults), inline or as a file, and `--config-from-checkpoint` (the "
        "architecture in the `.pt`'s training config).",
        "- `python -m sfd_jax.convert.dinov2 | semantic_vae | texture_vae --config-json …`: "
        "architectures beyond the presets, as `DinoV2Config` / `SemVAEConfig` / "
        "`TextureVAEConfig` fields or as the reference constructor's arguments "
        "(`DinoVisionTransformer`: `img_size`, `patch_size`, `embed_dim`, `depth`, "
        "`num_heads`, `init_values`, `num_register_tokens`, …, or `{\"hub_name\": "
        "\"dinov2_vitl14_reg\"}`; `SemanticVariationalAutoEncoder`: `input_dim`, "
        "`bottleneck_dim`, `hidden_dim`, `arch`, `transformer_heads`, "
        "`transformer_blocks`; the LDM autoencoder config with `embed_dim` and "
        "`ddconfig`, also the whole LDM YAML). Builders: "
        "`DinoV2Config.from_reference_kwargs`, `DinoV2Config.from_hub_name`, "
        "`SemVAEConfig.from_reference_kwargs`, `TextureVAEConfig.from_ldm`, "
        "`DiTConfig.from_reference_kwargs` / `from_reference_config`.",
    ],
}
