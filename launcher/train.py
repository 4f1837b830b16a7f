"""Train with a tensorft adapter (the same program as ``tensorft train`` of an installed package;
torchrun and deepspeed launch this file).

    python launcher/train.py --config configs/demo.yaml [--set key=value ...]
    torchrun --nproc_per_node 2 launcher/train.py --config ...
    deepspeed --num_gpus 8 launcher/train.py --config ...   (distributed.strategy: deepspeed)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tensorft.train import exit_process, main  # noqa: E402

if __name__ == "__main__":
    exit_process(main())
