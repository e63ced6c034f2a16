// Compatibility shim for building Horovod 0.28.1 against TensorFlow >= 2.19.
// Horovod includes the XLA builder from its pre-2.19 location; TF moved it to
// xla/hlo/builder/. This folder is put on CPLUS_INCLUDE_PATH by scripts/setup.sh.
#include "xla/hlo/builder/xla_builder.h"
