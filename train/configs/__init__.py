"""The configs of a run, apart from the code that uses them (TRL's `*_config.py` beside `*_trainer.py`).

`sections.py` holds the recipe's own sections (data, base models, instruction generator, model options); the four
trainer stages' argument classes sit one per file (`sft_config.py`, `teacher_config.py`, `distill_config.py`,
`gate_config.py`) over the shared `trainer_args.py`. This is the lowest floor of `train/`: it imports only
transformers, trl, peft and the model package, so the recipe (`train/infra/recipe.py`) reads every config without
importing a trainer, and each trainer module in `train/stages/` imports its config from here.
"""
