// The ahead-of-time-compiled Triton kernels, embedded at build time. The definitions are generated
// by tools/embed_kernels.py from one or more `python -m ce_kernels.aot` output folders (CMake
// runs it); a build with CE_TRT_EMBED_KERNELS=OFF embeds none.
#pragma once

#include <cstddef>

namespace ce_trt::embedded
{

struct Image
{
    char const* path; //!< the manifest's "cubin" value, e.g. "sm90/gate_up_swiglu_....cubin"
    unsigned char const* data;
    size_t size;
};

struct KernelSet
{
    char const* source;        //!< the AOT folder it came from (for messages)
    char const* manifest;      //!< manifest.json text
    size_t manifestSize;
    Image const* images;
    size_t numImages;
};

//! The embedded kernel sets (possibly none).
KernelSet const* kernelSets(size_t* count);

} // namespace ce_trt::embedded
