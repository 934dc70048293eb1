"""The command line (``egm-assist``): the top layer, above :mod:`egm.backend` and :mod:`egm.worker`.

``main.py`` builds the parser; ``commands/`` holds one module per subcommand; ``drive.py`` and
``errors.py`` are what several commands share (following a bulk run, one-line service errors).
"""
