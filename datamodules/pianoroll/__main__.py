"""``python -m datamodules.pianoroll SRC OUT [--workers N]``: ingest a MIDI folder into a phrase cache."""
from datamodules.pianoroll.ingestion import main

main()
