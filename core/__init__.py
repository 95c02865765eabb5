"""The foundation every other package builds on: user-facing errors, distributed helpers, the one
`generate`, record and file I/O. It imports nothing from the project's other packages."""
