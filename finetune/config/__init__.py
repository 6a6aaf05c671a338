"""The recipe: its schema (one dataclass per section, including data: and eval:), parsing, validation and chat
templates. Imports only finetune.core."""
