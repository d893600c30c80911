"""Tests of transport.wire: the frame codec."""
