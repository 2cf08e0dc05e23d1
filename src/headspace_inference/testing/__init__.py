"""For a host's tests and for trying the service without OpenRouter: the OpenRouter
emulator (``headspace_inference.testing.emulator``)."""
