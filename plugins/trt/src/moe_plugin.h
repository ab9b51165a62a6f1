// TensorRT IPluginV3 for one MoE / Compressed-Experts layer: ONNX nodes ce_export::MoE,
// CompressedMoE, SparseMixerMoE, CompressedSparseMixerMoE, SigmoidMoE, CompressedSigmoidMoE,
// ClampedSwiGLUMoE and CompressedClampedSwiGLUMoE (plugin_namespace "ce_export", plugin_version "1";
// one creator per op type, one plugin class). The math runs in the
// ahead-of-time-compiled Triton kernels of plugins/ce_kernels, launched through the CUDA driver
// API; the rules (shapes, types, workspace, launch plan) live in moe_plugin_logic.h.
#pragma once

#include "kernel_runtime.h"
#include "moe_plugin_logic.h"

#include <NvInferRuntime.h>

#include <array>
#include <memory>
#include <vector>

namespace ce_trt
{

//! The logger TensorRT gave the library: from setLoggerFinder (a library loaded with getCreators)
//! or getLogger() (one that registers itself). Defined in register_static.cpp / register_dynamic.cpp.
nvinfer1::ILogger* pluginLogger() noexcept;

void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;

class MoePlugin final : public nvinfer1::IPluginV3,
                        public nvinfer1::IPluginV3OneCore,
                        public nvinfer1::IPluginV3OneBuild,
                        public nvinfer1::IPluginV3OneRuntime
{
public:
    MoePlugin(Variant variant, MoeAttrs const& attrs);
    MoePlugin(MoePlugin const& other);
    MoePlugin& operator=(MoePlugin const&) = delete;
    ~MoePlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    //! Plan for the current shapes (onShapeChange / enqueue). Allocation-free when the kernels are
    //! already loaded in this context.
    bool prepare(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, std::string* error) noexcept;
    PlanRequest request(DType const* types, LayerDims const& dims) const;
    std::string where() const;

    Variant mVariant;
    MoeAttrs mAttrs;

    // Runtime state (rebuilt per execution context by onShapeChange).
    std::unique_ptr<LaunchPlan> mPlan;
    FunctionTable mFunctions{};
    DeviceInfo mDevice;
    bool mPlanValid{false};

    // getFieldsToSerialize storage.
    SerializedFields mSerialized;
    std::vector<nvinfer1::PluginField> mFieldList;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class MoePluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    explicit MoePluginCreator(Variant variant);
    ~MoePluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    Variant mVariant;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

//! The eight creators ("MoE", "CompressedMoE", "SparseMixerMoE", "CompressedSparseMixerMoE",
//! "SigmoidMoE", "CompressedSigmoidMoE", "ClampedSwiGLUMoE", "CompressedClampedSwiGLUMoE"), in that
//! order (kAllVariants'), shared by both registration mechanisms.
std::array<MoePluginCreator*, kNumVariants> const& allCreators();

} // namespace ce_trt
