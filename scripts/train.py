"""Train from a config file: `python scripts/train.py --config configs/unsupervised.yaml [flags]`.

The same as `grpo-learner`; kept as a script for those who run training from a checkout.
"""

from learner.cli import main

if __name__ == "__main__":
    main()
