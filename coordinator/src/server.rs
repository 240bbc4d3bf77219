//! Wires the gRPC services, health, reflection and middleware into one server.
