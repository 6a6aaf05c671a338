"""The stages (prep, base, sft, dpo, eval, hub push, report): each reads the run dir and writes its own folder.
They never import each other; the pipeline runs them in the registry's order."""
