"""HarmoFL-Lightning's command line: ``python cli.py fit|validate|test|compare --config configs/demo.yaml``.

The command line itself lives in :mod:`harmofl.cli`.
"""

from harmofl.cli import main

if __name__ == "__main__":
    main()
