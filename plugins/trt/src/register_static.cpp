// Registration for libce_export_trt.so: the creators register themselves with TensorRT's global
// plugin registry when the library is loaded (dlopen). This is what `trtexec --staticPlugins`,
// Polygraphy `--plugins` (ctypes.CDLL) and a plain dlopen / link in an application need.
//
// This library deliberately exports no getCreators / setLoggerFinder: IPluginRegistry::loadLibrary
// (trtexec --dynamicPlugins) would first run these static registrations and then fail to register
// the same creators again ("already registered"). Use libce_export_trt_dynamic.so for that path.
//
// REGISTER_TENSORRT_PLUGIN is not used because it registers under the namespace "" while our
// creators report "ce_export"; registering with the creator's own namespace keeps the two in
// agreement whichever one the registry keys on.
#include "moe_plugin.h"

namespace ce_trt
{
namespace
{

struct StaticRegistration
{
    StaticRegistration()
    {
        nvinfer1::IPluginRegistry* registry = getPluginRegistry();
        if (registry == nullptr)
        {
            return;
        }
        for (MoePluginCreator* creator : allCreators())
        {
            if (!registry->registerCreator(*creator, kPluginNamespace))
            {
                logMessage(nvinfer1::ILogger::Severity::kWARNING,
                    std::string("could not register ") + kPluginNamespace + "::" + creator->getPluginName()
                        + " (already registered?)");
            }
        }
    }
};

StaticRegistration const gRegistration;

} // namespace

nvinfer1::ILogger* pluginLogger() noexcept
{
    return getLogger();
}

} // namespace ce_trt
