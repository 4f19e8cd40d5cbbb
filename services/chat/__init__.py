"""The chat service (``opea.v1.ChatService``): chat completions, unary and streamed.

Backends (``OPEA_CHAT_BACKEND``):

``extractive`` (default, offline, no LLM)
    A grounded answerer: it quotes the sentences of the request's context passages that best
    match the question, verbatim, each followed by its ``[n]`` citation, and says plainly when
    it has nothing to quote. Model id ``extractive-answerer``.
``openai``
    Any OpenAI-compatible ``/v1/chat/completions`` server (vLLM, TGI, Ollama, llama.cpp,
    OpenAI), streamed chunk by chunk; the context passages go into a system message.
"""
