#include "kernel_runtime.h"

#include "cuda_driver.h"
#include "embedded_kernels.h"

#include <cstring>
#include <vector>

namespace ce_trt
{

KernelRuntime& KernelRuntime::instance()
{
    static KernelRuntime runtime;
    return runtime;
}

namespace
{

KernelLibrary embeddedLibrary()
{
    size_t count = 0;
    KernelSetDesc const* const* sets = embedded::kernelSets(&count);
    return KernelLibrary(std::vector<KernelSetDesc const*>(sets, sets + count));
}

} // namespace

KernelRuntime::KernelRuntime()
    : mLibrary(embeddedLibrary())
{
}

bool KernelRuntime::currentDevice(DeviceInfo& out, std::string* error) const
{
    cu::Driver const* d = cu::driver(error);
    if (d == nullptr)
    {
        return false;
    }
    CUcontext context = nullptr;
    CUresult r = d->ctxGetCurrent(&context);
    if (r != CUDA_SUCCESS || context == nullptr)
    {
        if (error != nullptr)
        {
            *error = "no current CUDA context (" + cu::resultText(*d, r) + ")";
        }
        return false;
    }
    CUdevice device = 0;
    int major = 0;
    int minor = 0;
    int shared = 0;
    r = d->ctxGetDevice(&device);
    if (r == CUDA_SUCCESS)
    {
        r = d->deviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device);
    }
    if (r == CUDA_SUCCESS)
    {
        r = d->deviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device);
    }
    if (r == CUDA_SUCCESS)
    {
        r = d->deviceGetAttribute(&shared, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, device);
    }
    if (r != CUDA_SUCCESS)
    {
        if (error != nullptr)
        {
            *error = "querying the device failed: " + cu::resultText(*d, r);
        }
        return false;
    }
    out.context = context;
    out.cc = major * 10 + minor;
    out.maxShared = shared;
    return true;
}

bool KernelRuntime::loadLocked(
    CUcontext context, int32_t set, int32_t kernel, int32_t image, CUfunction& function, std::string* error)
{
    auto const key = std::make_tuple(context, set, kernel, image);
    if (auto const it = mFunctions.find(key); it != mFunctions.end())
    {
        function = it->second;
        return true;
    }
    cu::Driver const* d = cu::driver(error);
    if (d == nullptr)
    {
        return false;
    }
    if (set < 0 || set >= static_cast<int32_t>(mLibrary.sets().size()) || kernel < 0
        || kernel >= mLibrary.set(set).numKernels || image < 0 || image >= mLibrary.set(set).kernels[kernel].numImages)
    {
        if (error != nullptr)
        {
            *error = "launch plan refers to no embedded kernel";
        }
        return false;
    }
    KernelDesc const& spec = mLibrary.set(set).kernels[kernel];
    KernelImage const& cubin = spec.images[image];
    CUmodule module = nullptr;
    CUresult r = d->moduleLoadData(&module, cubin.cubin);
    CUfunction loaded = nullptr;
    if (r == CUDA_SUCCESS)
    {
        r = d->moduleGetFunction(&loaded, module, cubin.entry);
    }
    if (r == CUDA_SUCCESS && cubin.shared > 48 * 1024)
    {
        // Like Triton's launcher: allow the opt-in maximum minus the static shared memory.
        int staticShared = 0;
        int optIn = 0;
        CUdevice device = 0;
        r = d->funcGetAttribute(&staticShared, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, loaded);
        if (r == CUDA_SUCCESS)
        {
            r = d->ctxGetDevice(&device);
        }
        if (r == CUDA_SUCCESS)
        {
            r = d->deviceGetAttribute(&optIn, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, device);
        }
        if (r == CUDA_SUCCESS && cubin.shared + staticShared > optIn)
        {
            if (error != nullptr)
            {
                *error = std::string(spec.stem) + " needs " + std::to_string(cubin.shared + staticShared)
                    + " B shared memory; the device allows " + std::to_string(optIn);
            }
            return false;
        }
        if (r == CUDA_SUCCESS)
        {
            r = d->funcSetAttribute(loaded, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, optIn - staticShared);
        }
    }
    if (r != CUDA_SUCCESS)
    {
        if (error != nullptr)
        {
            *error = "loading " + std::string(spec.stem) + " (sm_" + std::to_string(cubin.arch) + "): " + cu::resultText(*d, r);
        }
        return false;
    }
    mFunctions.emplace(key, loaded);
    function = loaded;
    return true;
}

bool KernelRuntime::resolve(LaunchPlan const& plan, CUcontext context, FunctionTable& functions, std::string* error)
{
    std::lock_guard<std::mutex> lock(mMutex);
    for (int32_t i = 0; i < plan.numLaunches; ++i)
    {
        if (!loadLocked(context, plan.set, plan.launches[i].kernel, plan.launches[i].image, functions[i], error))
        {
            return false;
        }
    }
    return true;
}

bool KernelRuntime::preload(int32_t set, int32_t arch, CUcontext context, std::string* error)
{
    if (set < 0 || set >= static_cast<int32_t>(mLibrary.sets().size()))
    {
        return false;
    }
    std::lock_guard<std::mutex> lock(mMutex);
    KernelSetDesc const& ks = mLibrary.set(set);
    for (int32_t k = 0; k < ks.numKernels; ++k)
    {
        for (int32_t i = 0; i < ks.kernels[k].numImages; ++i)
        {
            CUfunction function = nullptr;
            if (ks.kernels[k].images[i].arch == arch && !loadLocked(context, set, k, i, function, error))
            {
                return false;
            }
        }
    }
    return true;
}

CUresult KernelRuntime::launch(LaunchPlan const& plan, FunctionTable const& functions, uint64_t const* bufferBase,
    CUstream stream, int32_t& failedLaunch) const noexcept
{
    cu::Driver const* d = cu::driver(nullptr);
    if (d == nullptr)
    {
        failedLaunch = 0;
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    for (int32_t i = 0; i < plan.numLaunches; ++i)
    {
        KernelLaunch const& launch = plan.launches[i];
        uint64_t slots[kMaxKernelArgs];
        void* params[kMaxKernelArgs];
        for (int32_t a = 0; a < launch.numArgs; ++a)
        {
            LaunchArg const& arg = launch.args[a];
            slots[a] = 0;
            if (arg.kind == ArgKind::kPointer)
            {
                if (!resolvePointer(arg, bufferBase, slots[a]))
                {
                    failedLaunch = i;
                    return CUDA_ERROR_INVALID_VALUE;
                }
            }
            else
            {
                uint32_t const v = static_cast<uint32_t>(arg.value); // i32 / u32 bits, range checked in the plan
                std::memcpy(&slots[a], &v, sizeof(v));
            }
            params[a] = &slots[a];
        }
        CUresult const r = d->launchKernel(functions[i], launch.grid[0], launch.grid[1], launch.grid[2], launch.block,
            1, 1, launch.shared, stream, params, nullptr);
        if (r != CUDA_SUCCESS)
        {
            failedLaunch = i;
            return r;
        }
    }
    return CUDA_SUCCESS;
}

} // namespace ce_trt
