"""Configs: `schema` holds every section (type, default, range, doc per key) and each command's
sections; `loading` composes YAML files with `defaults:` lists and key=value overrides and checks
the result against the schema."""
