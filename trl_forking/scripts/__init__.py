"""The command lines, each a module with a ``run(argv)`` and ``python -m`` entry, behind ``trl-forking``:

- ``train`` (GRPO with forking-token selection from a recipe YAML; ``recipes/grpo_forking.py``), ``evaluate``
  (avg@n / pass@k on AIME or the bundled task; ``recipes/eval_aime.py``), ``ablate`` (the ablation study;
  ``recipes/ablation.py``), ``base_model`` (build the demo's base model), ``cli`` (the ``trl-forking`` dispatcher and
  the analysis commands ``analyze``, ``render``, ``overlap``, ``compare``);
- their plumbing, which only scripts import: ``recipe_args`` (YAML and flags), ``usage`` (one-line errors),
  ``console`` (compact log lines), ``launch`` (launcher checks), ``run_dir`` (output directories and resuming),
  ``plan`` (the ``--dry_run`` plan);
- ``configs/``: the demo's and the ablation's YAML (``recipes/demo.yaml`` and ``recipes/ablation.yaml`` link here).
"""
