"""The offline demo model: a small text-to-image diffusion model of a synthetic world of coloured shapes,
trained by ``python -m dedit_nb.offline.train`` and shipped in ``dedit_nb/assets/offline-model``."""
