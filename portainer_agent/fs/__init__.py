"""Filesystem access for the volume and host browser: everything beneath one open
directory, never outside it (:mod:`.jail`), the volume roots from Docker
(:mod:`.volumes`), streamed uploads (:mod:`.upload`) and host facts from sysfs
(:mod:`.hostinfo`)."""
