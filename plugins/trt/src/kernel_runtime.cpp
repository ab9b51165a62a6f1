#include "kernel_runtime.h"

#include "cuda_driver.h"
#include "embedded_kernels.h"

#include <cstring>
#include <string_view>
#include <vector>

namespace ce_trt
{

KernelRuntime& KernelRuntime::instance()
{
    static KernelRuntime runtime;
    return runtime;
}

KernelRuntime::KernelRuntime()
{
    size_t count = 0;
    embedded::KernelSet const* sets = embedded::kernelSets(&count);
    for (size_t i = 0; i < count; ++i)
    {
        std::string error;
        if (mLibrary.addManifest(std::string_view(sets[i].manifest, sets[i].manifestSize), sets[i].source, &error))
        {
            mEmbeddedIndex.push_back(i);
        }
        else
        {
            mErrors += (mErrors.empty() ? "" : "; ") + error;
        }
    }
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

bool KernelRuntime::loadLocked(CUcontext context, int32_t set, int32_t kernel, CUfunction& function, std::string* error)
{
    auto const key = std::make_tuple(context, set, kernel);
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
    if (set < 0 || set >= static_cast<int32_t>(mEmbeddedIndex.size()))
    {
        if (error != nullptr)
        {
            *error = "launch plan refers to no embedded kernel set";
        }
        return false;
    }
    size_t numSets = 0;
    embedded::KernelSet const& images = embedded::kernelSets(&numSets)[mEmbeddedIndex[set]];
    KernelSpec const& spec = mLibrary.sets()[set].kernels[kernel];
    embedded::Image const* image = nullptr;
    for (size_t j = 0; j < images.numImages; ++j)
    {
        if (spec.cubin == images.images[j].path)
        {
            image = &images.images[j];
            break;
        }
    }
    if (image == nullptr)
    {
        if (error != nullptr)
        {
            *error = spec.stem + ": cubin " + spec.cubin + " is not embedded";
        }
        return false;
    }
    CUmodule module = nullptr;
    CUresult r = d->moduleLoadData(&module, image->data);
    CUfunction loaded = nullptr;
    if (r == CUDA_SUCCESS)
    {
        r = d->moduleGetFunction(&loaded, module, spec.entry.c_str());
    }
    if (r == CUDA_SUCCESS && spec.shared > 48 * 1024)
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
        if (r == CUDA_SUCCESS && spec.shared + staticShared > optIn)
        {
            if (error != nullptr)
            {
                *error = spec.stem + " needs " + std::to_string(spec.shared + staticShared)
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
            *error = "loading " + spec.stem + " (" + spec.cubin + "): " + cu::resultText(*d, r);
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
        if (!loadLocked(context, plan.set, plan.launches[i].kernel, functions[i], error))
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
    std::vector<KernelSpec> const& kernels = mLibrary.sets()[set].kernels;
    for (size_t k = 0; k < kernels.size(); ++k)
    {
        CUfunction function = nullptr;
        if (kernels[k].arch == arch && !loadLocked(context, set, static_cast<int32_t>(k), function, error))
        {
            return false;
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
            else if (argKindSize(arg.kind) == 4)
            {
                uint32_t const v = static_cast<uint32_t>(arg.value); // i32 / u32 bits, range checked in the plan
                std::memcpy(&slots[a], &v, sizeof(v));
            }
            else
            {
                std::memcpy(&slots[a], &arg.value, sizeof(arg.value));
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
