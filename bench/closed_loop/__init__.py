"""The closed-loop benchmark's parts (``bench/loop.py`` is the command; docs/loop.md the guide).

* :mod:`.workspace`: the loop's folder (scenes, models, export, Label Studio data), its manifest and state;
* :mod:`.stack`: a private Label Studio (persistent across commands) and redis-server;
* :mod:`.annotator`: the scenes' true boxes written as an annotator's corrections of a prediction;
* :mod:`.gpu_stage`: fine-tuning on the export and held-out figures (the one GPU call);
* :mod:`.report`: tables, JSON and Markdown of a run.
"""
