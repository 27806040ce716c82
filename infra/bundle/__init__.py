"""The air-gap supply chain: lock → bundle build → verify → import into a segment's mirror."""
