"""Close the loop: accepted human corrections -> EGM training data (SFT, GRPO) and COCO.

Modules: :mod:`~egm.export.accepted` (which annotations count), :mod:`~egm.export.regions`
(Label Studio results -> grid boxes and texts), :mod:`~egm.export.corrections` (what the
human did to each predicted box), :mod:`~egm.export.live` (the same figures from webhooks),
:mod:`~egm.export.images`, :mod:`~egm.export.samples`, the writers :mod:`~egm.export.sft`,
:mod:`~egm.export.grpo`, :mod:`~egm.export.coco`, :mod:`~egm.export.report`, the verl
reward :mod:`~egm.export.reward`, and :mod:`~egm.export.exporter` (``run_export``).
See docs/export.md.
"""
