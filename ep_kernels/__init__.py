from ._backend import use_backend, available_backends, backend_for
