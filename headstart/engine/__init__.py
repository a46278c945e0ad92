"""The engine: the facade the doors call, the model thread's loop, a request's output, the gate."""
