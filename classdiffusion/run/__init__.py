"""The training run: images → cached latents → the loop → a concept file.

``train`` is the loop (``TrainingRun``, ``train()``); ``data`` loads and augments images;
``memory`` plans a run's peak before it starts; ``validation`` samples previews; ``resume`` and
``distributed`` continue and spread a run; ``jobs`` queues runs; ``progress``, ``summary`` and
``plot`` report it. Imports the model parts, the methods, the hosts' interface and the concept
file; nothing below imports it.
"""
