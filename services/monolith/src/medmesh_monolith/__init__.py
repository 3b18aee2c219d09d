"""The monolith topology: the four services' stage code in one process (``medmesh up
--topology monolith``), for measuring what the Kafka hops between the services cost."""
