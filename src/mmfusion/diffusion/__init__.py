"""Joint image + text diffusion (A9, T10; docs/diffusion.md): one UniDiffuser-style denoiser over a pixel-patch
image latent and a word-vector text latent, each at its own timestep.

`config.py` (the `model:` section), `schedule.py` (DDPM schedule, DDIM step), `latents.py` (the two latents),
`model.py` (denoiser, EMA, consistency losses), `sampling.py` (DDIM + guidance), `recipe.py` (data, Trainer
run, model folder), `evaluate.py` (judge-based metrics), `generate.py`
(`mmfusion generate`); `mmfusion train` runs it through `mmfusion.run.train_diffusion`."""
