"""A Dist of one Horovod process with no backend started: what unit tests run plans on."""
from common.dist import Dist, Group, ReplicaGroup
from common.mesh import Mesh

ALONE = Group((0,), 0)
ONE_PROCESS = Dist("horovod", 0, 1, 0, Mesh(1, 1, 1), ALONE, ALONE, ALONE)
MIRRORED = Dist("mirrored", 0, 1, 0, Mesh(1, 1, 1), ReplicaGroup(2), ALONE, ALONE)
