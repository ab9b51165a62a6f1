// The few CUDA driver API entry points the plugin uses, looked up at run time with dlopen
// ("libcuda.so.1", installed with the NVIDIA driver). The library therefore links neither libcuda
// (whose link stub is not in every toolkit install) nor the CUDA runtime.
#pragma once

#include <cuda.h>

#include <string>

namespace ce_trt::cu
{

struct Driver
{
    decltype(&::cuInit) init{nullptr};
    decltype(&::cuGetErrorString) getErrorString{nullptr};
    decltype(&::cuCtxGetCurrent) ctxGetCurrent{nullptr};
    decltype(&::cuCtxGetDevice) ctxGetDevice{nullptr};
    decltype(&::cuDeviceGetAttribute) deviceGetAttribute{nullptr};
    decltype(&::cuModuleLoadData) moduleLoadData{nullptr};
    decltype(&::cuModuleGetFunction) moduleGetFunction{nullptr};
    decltype(&::cuFuncGetAttribute) funcGetAttribute{nullptr};
    decltype(&::cuFuncSetAttribute) funcSetAttribute{nullptr};
    decltype(&::cuLaunchKernel) launchKernel{nullptr};
};

//! The driver, loaded and initialised once (thread-safe); nullptr with a message when the driver
//! library is missing or cuInit fails.
Driver const* driver(std::string* error);

//! "CUDA_ERROR_... (text)" for a result code.
std::string resultText(Driver const& d, CUresult result);

} // namespace ce_trt::cu
