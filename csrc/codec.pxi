# Packet codec and gRPC framing (compiled twin of konnectivity_fast/wire/_codec.py).
