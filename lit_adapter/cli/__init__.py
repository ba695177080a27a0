"""The command lines: the finetune and generate commands and their parser."""
