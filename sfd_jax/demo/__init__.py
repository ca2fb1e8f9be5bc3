"""The embedded demo: the whole SFD pipeline on scikit-learn's handwritten digits on one CPU.

``python main.py --config=configs/demo.py --mode=demo --workdir=runs/demo`` (or ``make demo``).
See ``sfd_jax.demo.pipeline`` for the stages and README "Quick start".
"""
