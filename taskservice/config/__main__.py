"""`python -m taskservice.config > docs/configuration.md`: the settings
reference, generated from the declarations."""

from taskservice.config import settings_markdown

print(settings_markdown(), end="")
