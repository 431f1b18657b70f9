"""A submodule, to show that a plugin can be more than one file."""


def greet(greeting: str, name: str) -> str:
    return f"{greeting}, {name}!"
