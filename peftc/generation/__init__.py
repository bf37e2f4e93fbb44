"""Generation with ``--task text-generation`` artifacts: ``runner.generate`` and ``peftc generate``."""
