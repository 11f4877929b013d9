"""The one exception type that means "the user's input is wrong" (exit code 2 on the command line)."""


class InputError(ValueError):
    """Bad input or configuration: the message is one line that names the file or key at fault."""
