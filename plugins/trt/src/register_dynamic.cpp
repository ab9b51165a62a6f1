// Registration for libce_export_trt_dynamic.so: no static registration; TensorRT asks the library
// for its creators through the two C entry points below. This is what IPluginRegistry::loadLibrary,
// `trtexec --dynamicPlugins` and `--setPluginsToSerialize` (plugin library stored in the plan) need.
// Do not also load libce_export_trt.so into the same process: both provide the same eight
// "ce_export::..." creators, and the second registration fails.
#include "moe_plugin.h"

#include <array>
#include <atomic>

namespace ce_trt
{
namespace
{

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

} // namespace

nvinfer1::ILogger* pluginLogger() noexcept
{
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    return finder != nullptr ? finder->findLogger() : nullptr;
}

} // namespace ce_trt

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    nvinfer1::ILoggerFinder* expected = nullptr;
    ce_trt::gLoggerFinder.compare_exchange_strong(expected, finder);
}

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nbCreators)
{
    static std::array<nvinfer1::IPluginCreatorInterface*, ce_trt::kNumVariants> const creators = [] {
        std::array<nvinfer1::IPluginCreatorInterface*, ce_trt::kNumVariants> list{};
        for (int32_t i = 0; i < ce_trt::kNumVariants; ++i)
        {
            list[i] = ce_trt::allCreators()[i];
        }
        return list;
    }();
    nbCreators = ce_trt::kNumVariants;
    return creators.data();
}
