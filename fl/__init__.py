"""tensorwire's federated-learning layer. It uses the transport only through `transport`'s public
API. For now it holds the command-line entry point; the Client and Controller APIs follow."""
