"""The parts of Horovod's `horovod.common` that training scripts import
(``from horovod.common.exceptions import HostsUpdatedInterrupt``)."""
