"""A small synthetic world in which a concept can be learned, composed and measured without
downloaded weights: rendered objects with real class words, attributes and scenes
(:mod:`.world`), and an independent checker that reads back what a picture shows (:mod:`.checker`)."""
