// The kernel sets compiled into this library: tools/embed_kernels.py generates the definition from
// one or more `python -m ce_kernels.aot` output folders (their kernel_set.inc); CMake runs it. A
// build with CE_TRT_EMBED_KERNELS=OFF embeds none.
#pragma once

#include "moe_plugin_logic.h"

#include <cstddef>

namespace ce_trt::embedded
{

//! The embedded kernel sets (possibly none).
KernelSetDesc const* const* kernelSets(size_t* count);

} // namespace ce_trt::embedded
