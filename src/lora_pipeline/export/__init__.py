"""After training: the adapter merged into its base (`merged`), written as GGUF (`gguf`) with an Ollama
`Modelfile` (`ollama`)."""
