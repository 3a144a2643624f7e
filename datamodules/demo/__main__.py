"""``python -m datamodules.demo OUT [--seed 0] [--parts midi,loops,multitrack]``: write the demo data."""
from datamodules.demo.parts import main

main()
