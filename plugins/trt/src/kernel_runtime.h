// Loads the embedded cubins into the current CUDA context and launches a LaunchPlan with the CUDA
// driver API. No TensorRT dependency.
//
// Modules are loaded once per (context, kernel) and kept for the life of the process (a plugin
// library is not unloaded while engines using it exist, and unloading at exit races the driver's
// own teardown). Loading happens in configurePlugin / onShapeChange, never in enqueue's normal path.
#pragma once

#include "moe_plugin_logic.h"

#include <cuda.h>

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

namespace ce_trt
{

struct DeviceInfo
{
    CUcontext context{nullptr};
    int32_t cc{0};        //!< compute capability, major * 10 + minor
    int64_t maxShared{0}; //!< opt-in dynamic shared memory per block
};

using FunctionTable = std::array<CUfunction, kMaxLaunches>;

class KernelRuntime
{
public:
    static KernelRuntime& instance();

    //! The embedded kernel sets.
    KernelLibrary const& library() const { return mLibrary; }

    //! The current context's device; false with a message when there is no driver or context.
    bool currentDevice(DeviceInfo& out, std::string* error) const;

    //! The CUfunction of every launch of `plan` in `context`, loading modules on first use.
    bool resolve(LaunchPlan const& plan, CUcontext context, FunctionTable& functions, std::string* error);

    //! Loads every kernel of `set` compiled for `arch` into `context` (best effort, for
    //! attachToContext: afterwards no module is loaded while a CUDA graph may be capturing).
    bool preload(int32_t set, int32_t arch, CUcontext context, std::string* error);

    //! Launches the plan on `stream`. `bufferBase` has kMaxBuffers entries: the I/O buffers, then
    //! the workspace buffers. No allocation, no synchronisation. Returns CUDA_SUCCESS or the
    //! failing result (CUDA_ERROR_INVALID_VALUE for a missing or misaligned buffer, with the launch
    //! index in `failedLaunch`).
    CUresult launch(LaunchPlan const& plan, FunctionTable const& functions, uint64_t const* bufferBase, CUstream stream,
        int32_t& failedLaunch) const noexcept;

private:
    KernelRuntime();
    //! Under mMutex: the function for (context, set, kernel, image), loading its module if needed.
    bool loadLocked(
        CUcontext context, int32_t set, int32_t kernel, int32_t image, CUfunction& function, std::string* error);

    KernelLibrary mLibrary;
    std::mutex mMutex;
    std::map<std::tuple<CUcontext, int32_t, int32_t, int32_t>, CUfunction> mFunctions; //!< (context, set, kernel, image)
};

} // namespace ce_trt
