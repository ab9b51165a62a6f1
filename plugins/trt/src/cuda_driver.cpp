#include "cuda_driver.h"

#include <dlfcn.h>

#include <mutex>

namespace ce_trt::cu
{

namespace
{

template <typename F>
bool lookup(void* handle, char const* name, F& out)
{
    out = reinterpret_cast<F>(dlsym(handle, name));
    return out != nullptr;
}

struct Loaded
{
    Driver driver;
    std::string error;
    bool ok{false};
};

Loaded const& load()
{
    static Loaded loaded;
    static std::once_flag once;
    std::call_once(once, [] {
        // Never dlclose'd: CUDA objects created through it live as long as the process.
        void* handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (handle == nullptr)
        {
            handle = dlopen("libcuda.so", RTLD_NOW | RTLD_LOCAL);
        }
        if (handle == nullptr)
        {
            char const* why = dlerror();
            loaded.error = std::string("cannot load the CUDA driver (libcuda.so.1): ") + (why ? why : "unknown error");
            return;
        }
        Driver& d = loaded.driver;
        bool const all = lookup(handle, "cuInit", d.init) && lookup(handle, "cuGetErrorString", d.getErrorString)
            && lookup(handle, "cuCtxGetCurrent", d.ctxGetCurrent) && lookup(handle, "cuCtxGetDevice", d.ctxGetDevice)
            && lookup(handle, "cuDeviceGetAttribute", d.deviceGetAttribute)
            && lookup(handle, "cuModuleLoadData", d.moduleLoadData)
            && lookup(handle, "cuModuleGetFunction", d.moduleGetFunction)
            && lookup(handle, "cuFuncGetAttribute", d.funcGetAttribute)
            && lookup(handle, "cuFuncSetAttribute", d.funcSetAttribute)
            && lookup(handle, "cuLaunchKernel", d.launchKernel);
        if (!all)
        {
            loaded.error = "the CUDA driver library lacks an entry point the plugin needs";
            return;
        }
        CUresult const r = d.init(0);
        if (r != CUDA_SUCCESS)
        {
            loaded.error = "cuInit failed: " + resultText(d, r);
            return;
        }
        loaded.ok = true;
    });
    return loaded;
}

} // namespace

Driver const* driver(std::string* error)
{
    Loaded const& loaded = load();
    if (!loaded.ok)
    {
        if (error != nullptr)
        {
            *error = loaded.error;
        }
        return nullptr;
    }
    return &loaded.driver;
}

std::string resultText(Driver const& d, CUresult result)
{
    char const* text = nullptr;
    if (d.getErrorString == nullptr || d.getErrorString(result, &text) != CUDA_SUCCESS || text == nullptr)
    {
        return "CUDA error " + std::to_string(static_cast<int>(result));
    }
    return std::string(text) + " (" + std::to_string(static_cast<int>(result)) + ")";
}

} // namespace ce_trt::cu
