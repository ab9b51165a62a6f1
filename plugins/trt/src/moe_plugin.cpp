#include "moe_plugin.h"

#include "cuda_driver.h"

#include <algorithm>
#include <cstdio>
#include <exception>

namespace ce_trt
{

using nvinfer1::DataType;
using nvinfer1::ILogger;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

namespace
{

DType toDType(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return DType::kFP32;
    case DataType::kHALF: return DType::kFP16;
    case DataType::kBF16: return DType::kBF16;
    case DataType::kINT32: return DType::kINT32;
    case DataType::kINT64: return DType::kINT64;
    default: return DType::kOther;
    }
}

FieldType toFieldType(PluginFieldType t)
{
    switch (t)
    {
    case PluginFieldType::kINT32: return FieldType::kINT32;
    case PluginFieldType::kINT64: return FieldType::kINT64;
    case PluginFieldType::kFLOAT32: return FieldType::kFLOAT32;
    case PluginFieldType::kFLOAT64: return FieldType::kFLOAT64;
    case PluginFieldType::kCHAR: return FieldType::kCHAR;
    default: return FieldType::kOther;
    }
}

PluginFieldType toPluginFieldType(FieldType t)
{
    switch (t)
    {
    case FieldType::kINT32: return PluginFieldType::kINT32;
    case FieldType::kINT64: return PluginFieldType::kINT64;
    case FieldType::kFLOAT32: return PluginFieldType::kFLOAT32;
    case FieldType::kFLOAT64: return PluginFieldType::kFLOAT64;
    case FieldType::kCHAR: return PluginFieldType::kCHAR;
    case FieldType::kOther: return PluginFieldType::kUNKNOWN;
    }
    return PluginFieldType::kUNKNOWN;
}

Shape toShape(nvinfer1::Dims const& dims)
{
    Shape s;
    s.rank = dims.nbDims < 0 ? 0 : (dims.nbDims > kMaxRank ? kMaxRank : dims.nbDims);
    for (int32_t i = 0; i < s.rank; ++i)
    {
        s.d[i] = dims.d[i];
    }
    return s;
}

int64_t tokensOf(nvinfer1::Dims const& hidden)
{
    int64_t tokens = 1;
    for (int32_t i = 0; i + 1 < hidden.nbDims; ++i)
    {
        tokens *= hidden.d[i];
    }
    return tokens;
}

} // namespace

void logMessage(ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        std::string const line = "[ce_export MoE plugin] " + message;
        if (ILogger* logger = pluginLogger())
        {
            logger->log(severity, line.c_str());
        }
        else if (severity == ILogger::Severity::kERROR || severity == ILogger::Severity::kINTERNAL_ERROR)
        {
            std::fprintf(stderr, "%s\n", line.c_str());
        }
    }
    catch (...)
    {
    }
}

// ------------------------------------------------------------------------------------------------
// MoePlugin

MoePlugin::MoePlugin(Variant variant, MoeAttrs const& attrs)
    : mVariant(variant)
    , mAttrs(attrs)
    , mPlan(std::make_unique<LaunchPlan>())
{
    mFieldList.reserve(4);
}

MoePlugin::MoePlugin(MoePlugin const& other)
    : nvinfer1::IPluginV3(other)
    , nvinfer1::IPluginV3OneCore(other)
    , nvinfer1::IPluginV3OneBuild(other)
    , nvinfer1::IPluginV3OneRuntime(other)
    , mVariant(other.mVariant)
    , mAttrs(other.mAttrs)
    , mPlan(std::make_unique<LaunchPlan>(*other.mPlan))
    , mFunctions(other.mFunctions)
    , mDevice(other.mDevice)
    , mPlanValid(other.mPlanValid)
{
    mFieldList.reserve(4);
}

std::string MoePlugin::where() const
{
    return describeLayer(mVariant, mAttrs);
}

nvinfer1::IPluginCapability* MoePlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* MoePlugin::clone() noexcept
{
    try
    {
        return new MoePlugin(*this);
    }
    catch (std::exception const& e)
    {
        logMessage(ILogger::Severity::kERROR, std::string("clone failed: ") + e.what());
    }
    catch (...)
    {
    }
    return nullptr;
}

char const* MoePlugin::getPluginName() const noexcept
{
    return pluginName(mVariant);
}

char const* MoePlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* MoePlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t MoePlugin::getNbOutputs() const noexcept
{
    return kNumOutputs;
}

int32_t MoePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    try
    {
        if (nbOutputs != kNumOutputs || nbInputs != numInputs(mVariant))
        {
            logMessage(ILogger::Severity::kERROR, where() + ": expected " + std::to_string(numInputs(mVariant))
                    + " inputs and 1 output");
            return -1;
        }
        DType types[kMaxInputs];
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            types[i] = toDType(inputTypes[i]);
        }
        std::string error;
        if (!checkTypes(mVariant, types, nbInputs, &error))
        {
            logMessage(ILogger::Severity::kERROR, error);
            return -1;
        }
        outputTypes[0] = inputTypes[kHidden];
        return 0;
    }
    catch (...)
    {
        return -1;
    }
}

int32_t MoePlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    try
    {
        if (nbOutputs != kNumOutputs || nbInputs != numInputs(mVariant))
        {
            logMessage(ILogger::Severity::kERROR, where() + ": expected " + std::to_string(numInputs(mVariant))
                    + " inputs and 1 output, got " + std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
            return -1;
        }
        Shape shapes[kMaxInputs];
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            Shape& s = shapes[i];
            s.rank = inputs[i].nbDims < 0 ? 0 : (inputs[i].nbDims > kMaxRank ? kMaxRank : inputs[i].nbDims);
            for (int32_t j = 0; j < s.rank; ++j)
            {
                nvinfer1::IDimensionExpr const* e = inputs[i].d[j];
                s.d[j] = e != nullptr && e->isConstant() ? e->getConstantValue() : -1;
            }
        }
        LayerDims dims;
        std::string error;
        if (!checkShapes(mVariant, shapes, nbInputs, dims, &error))
        {
            logMessage(ILogger::Severity::kERROR, error);
            return -1;
        }
        outputs[0] = inputs[kHidden]; // outputShape(): hidden's shape
        return 0;
    }
    catch (...)
    {
        return -1;
    }
}

bool MoePlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != numInputs(mVariant) || nbOutputs != kNumOutputs || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    TensorTypeFormat tf[kMaxInputs + kNumOutputs];
    for (int32_t i = 0; i <= pos; ++i)
    {
        tf[i].type = toDType(inOut[i].desc.type);
        tf[i].linear = inOut[i].desc.format == nvinfer1::TensorFormat::kLINEAR;
    }
    KernelLibrary const& library = KernelRuntime::instance().library();
    return supportsCombination(mVariant, mAttrs, pos, tf, nbInputs, nbOutputs, library.empty() ? nullptr : &library);
}

PlanRequest MoePlugin::request(DType const* types, LayerDims const& dims) const
{
    PlanRequest req;
    req.variant = mVariant;
    req.attrs = mAttrs;
    req.activation = types[kHidden];
    req.logits = types[kRouterLogits];
    req.dims = dims;
    return req;
}

int32_t MoePlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    try
    {
        if (nbInputs != numInputs(mVariant) || nbOutputs != kNumOutputs)
        {
            logMessage(ILogger::Severity::kERROR, where() + ": wrong number of inputs or outputs");
            return -1;
        }
        DType types[kMaxInputs];
        Shape maxShapes[kMaxInputs];
        Shape minShapes[kMaxInputs];
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            types[i] = toDType(in[i].desc.type);
            maxShapes[i] = toShape(in[i].max);
            minShapes[i] = toShape(in[i].min);
        }
        std::string error;
        LayerDims maxDims;
        LayerDims minDims;
        if (!checkTypes(mVariant, types, nbInputs, &error) || !checkShapes(mVariant, maxShapes, nbInputs, maxDims, &error)
            || !checkShapes(mVariant, minShapes, nbInputs, minDims, &error))
        {
            logMessage(ILogger::Severity::kERROR, error);
            return -1;
        }
        if (maxDims.T < 0 || minDims.T < 0)
        {
            logMessage(ILogger::Severity::kERROR, where() + ": the profile does not bound the token count");
            return -1;
        }
        KernelRuntime& runtime = KernelRuntime::instance();
        KernelLibrary const& library = runtime.library();
        if (library.empty())
        {
            logMessage(ILogger::Severity::kERROR,
                where() + ": this plugin library has no kernels embedded (built with CE_TRT_EMBED_KERNELS=OFF?)");
            return -1;
        }
        // Informational (serialized): configurePlugin runs once per profile, possibly on clones.
        mAttrs.maxTokens = std::max(mAttrs.maxTokens, maxDims.T);
        PlanRequest req = request(types, maxDims);
        std::vector<int32_t> archs;
        DeviceInfo device;
        std::string deviceError;
        bool const haveDevice = runtime.currentDevice(device, &deviceError);
        if (haveDevice)
        {
            int32_t const arch = selectArch(library.archs(), device.cc);
            if (arch < 0)
            {
                logMessage(ILogger::Severity::kERROR, where() + ": no kernel image runs on this GPU (sm_"
                        + std::to_string(device.cc) + "); embedded: " + library.describe());
                return -1;
            }
            archs.push_back(arch);
            req.maxSharedBytes = device.maxShared;
        }
        else
        {
            logMessage(ILogger::Severity::kWARNING,
                where() + ": " + deviceError + "; checking the profile against every embedded architecture");
            // With no matching set, the plan check below says what is missing.
            int32_t const set = library.findSet(mAttrs, maxDims.E);
            archs = set >= 0 ? std::vector<int32_t>(library.set(set).archs, library.set(set).archs + library.set(set).numArchs)
                             : library.archs();
        }
        if (!checkTokenRange(library, req, minDims.T, maxDims.T, archs, &error))
        {
            logMessage(ILogger::Severity::kERROR, where() + ": " + error);
            return -1;
        }
        if (haveDevice)
        {
            // Load the kernels now, so that a bad image fails the build rather than the first run.
            for (int64_t t : {std::max<int64_t>(minDims.T, 1), maxDims.T})
            {
                req.dims.T = t;
                req.arch = archs.front();
                FunctionTable functions{};
                if (!buildLaunchPlan(library, req, *mPlan, &error)
                    || !runtime.resolve(*mPlan, device.context, functions, &error))
                {
                    logMessage(ILogger::Severity::kERROR, where() + ": " + error);
                    return -1;
                }
            }
            mPlanValid = false;
        }
        logMessage(ILogger::Severity::kVERBOSE, where() + ": configured for T " + std::to_string(minDims.T) + ".."
                + std::to_string(maxDims.T) + ", H=" + std::to_string(maxDims.H) + ", I=" + std::to_string(maxDims.I)
                + ", E=" + std::to_string(maxDims.E) + ", " + dtypeName(types[kHidden]) + " activations, "
                + dtypeName(types[kRouterLogits]) + " router logits");
        return 0;
    }
    catch (std::exception const& e)
    {
        logMessage(ILogger::Severity::kERROR, where() + ": configurePlugin: " + e.what());
        return -1;
    }
    catch (...)
    {
        return -1;
    }
}

size_t MoePlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    try
    {
        if (nbInputs != numInputs(mVariant))
        {
            return 0;
        }
        DType types[kMaxInputs];
        Shape shapes[kMaxInputs];
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            types[i] = toDType(inputs[i].desc.type);
            shapes[i] = toShape(inputs[i].max);
        }
        LayerDims dims;
        std::string error;
        if (!checkShapes(mVariant, shapes, nbInputs, dims, &error))
        {
            logMessage(ILogger::Severity::kERROR, error);
            return 0;
        }
        size_t const bytes = workspaceBytes(KernelRuntime::instance().library(), request(types, dims), &error);
        if (bytes == 0 && !error.empty())
        {
            logMessage(ILogger::Severity::kERROR, where() + ": " + error);
        }
        return bytes;
    }
    catch (...)
    {
        return 0;
    }
}

bool MoePlugin::prepare(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, std::string* error) noexcept
{
    try
    {
        mPlanValid = false;
        DType types[kMaxInputs];
        Shape shapes[kMaxInputs];
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            types[i] = toDType(in[i].type);
            shapes[i] = toShape(in[i].dims);
        }
        LayerDims dims;
        if (!checkTypes(mVariant, types, nbInputs, error) || !checkShapes(mVariant, shapes, nbInputs, dims, error))
        {
            return false;
        }
        if (dims.T < 0)
        {
            *error = "token count unknown at run time";
            return false;
        }
        KernelRuntime& runtime = KernelRuntime::instance();
        KernelLibrary const& library = runtime.library();
        if (!runtime.currentDevice(mDevice, error))
        {
            return false;
        }
        int32_t const arch = selectArch(library.archs(), mDevice.cc);
        if (arch < 0)
        {
            *error = "no kernel image runs on this GPU (sm_" + std::to_string(mDevice.cc) + "); embedded: " + library.describe();
            return false;
        }
        PlanRequest req = request(types, dims);
        req.arch = arch;
        req.maxSharedBytes = mDevice.maxShared;
        if (!buildLaunchPlan(library, req, *mPlan, error) || !runtime.resolve(*mPlan, mDevice.context, mFunctions, error))
        {
            return false;
        }
        mPlanValid = true;
        return true;
    }
    catch (std::exception const& e)
    {
        *error = e.what();
        return false;
    }
    catch (...)
    {
        *error = "unknown exception";
        return false;
    }
}

int32_t MoePlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != numInputs(mVariant) || nbOutputs != kNumOutputs)
    {
        return -1;
    }
    if (tokensOf(in[kHidden].dims) == 0)
    {
        mPlanValid = false;
        return 0;
    }
    std::string error;
    if (!prepare(in, nbInputs, &error))
    {
        logMessage(ILogger::Severity::kERROR, where() + ": " + error);
        return -1;
    }
    return 0;
}

int32_t MoePlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    int64_t const tokens = tokensOf(inputDesc[kHidden].dims);
    if (tokens == 0)
    {
        return 0;
    }
    cu::Driver const* driver = cu::driver(nullptr);
    CUcontext context = nullptr;
    if (driver == nullptr || driver->ctxGetCurrent(&context) != CUDA_SUCCESS)
    {
        logMessage(ILogger::Severity::kERROR, where() + ": no CUDA driver / context in enqueue");
        return 1;
    }
    if (!mPlanValid || mPlan->tokens != tokens || context != mDevice.context)
    {
        // onShapeChange normally did this; rebuilding here only happens if TensorRT skipped it.
        std::string error;
        if (!prepare(inputDesc, numInputs(mVariant), &error))
        {
            logMessage(ILogger::Severity::kERROR, where() + ": " + error);
            return 1;
        }
    }
    // TensorRT gives at least getWorkspaceSize() for the profile in use (its max shapes); the layout
    // for the actual T is no larger (computeWorkspace is monotone in T).
    LaunchPlan const& plan = *mPlan;
    if (plan.workspace.total > 0 && workspace == nullptr)
    {
        logMessage(ILogger::Severity::kERROR, where() + ": TensorRT gave no workspace");
        return 1;
    }
    uint64_t bases[kMaxBuffers] = {};
    for (int32_t i = 0; i < numInputs(mVariant); ++i)
    {
        bases[inputBuffer(mVariant, i)] = reinterpret_cast<uint64_t>(inputs[i]);
    }
    bases[kBufOut] = reinterpret_cast<uint64_t>(outputs[0]);
    for (int32_t i = 0; i < plan.workspace.count; ++i)
    {
        bases[kNumIoBuffers + i] = reinterpret_cast<uint64_t>(workspace) + plan.workspace.offset[i];
    }
    int32_t failed = -1;
    CUresult const r = KernelRuntime::instance().launch(plan, mFunctions, bases, stream, failed);
    if (r != CUDA_SUCCESS)
    {
        KernelDesc const& spec = KernelRuntime::instance().library().set(plan.set).kernels[plan.launches[failed].kernel];
        logMessage(ILogger::Severity::kERROR, where() + ": launching " + std::string(spec.stem) + " failed: "
                + (r == CUDA_ERROR_INVALID_VALUE ? std::string("a buffer is missing or not 16-byte aligned")
                                                 : cu::resultText(*driver, r)));
        return 1;
    }
    return 0;
}

nvinfer1::IPluginV3* MoePlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    // Load this layer's kernels now (once per CUDA context), so that no module is loaded in the
    // first enqueue, which an application may be capturing into a CUDA graph. Best effort: a failure
    // here is reported by onShapeChange.
    try
    {
        KernelRuntime& runtime = KernelRuntime::instance();
        DeviceInfo device;
        if (runtime.currentDevice(device, nullptr))
        {
            int32_t const arch = selectArch(runtime.library().archs(), device.cc);
            for (int32_t set : runtime.library().setsFor(mAttrs))
            {
                std::string error;
                if (arch >= 0 && !runtime.preload(set, arch, device.context, &error))
                {
                    logMessage(ILogger::Severity::kVERBOSE, where() + ": preloading kernels: " + error);
                }
            }
        }
    }
    catch (...)
    {
    }
    return clone();
}

nvinfer1::PluginFieldCollection const* MoePlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mSerialized.fill(mVariant, mAttrs);
        mFieldList.clear();
        for (int32_t i = 0; i < mSerialized.count(); ++i)
        {
            FieldView const& f = mSerialized.fields()[i];
            mFieldList.emplace_back(f.name, f.data, toPluginFieldType(f.type), f.length);
        }
        mFieldCollection.nbFields = static_cast<int32_t>(mFieldList.size());
        mFieldCollection.fields = mFieldList.data();
        return &mFieldCollection;
    }
    catch (...)
    {
        return nullptr;
    }
}

// ------------------------------------------------------------------------------------------------
// MoePluginCreator

MoePluginCreator::MoePluginCreator(Variant variant)
    : mVariant(variant)
{
    for (FieldView const& f : creatorFieldNames(variant))
    {
        mFields.emplace_back(f.name, nullptr, toPluginFieldType(f.type), f.length);
    }
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
}

char const* MoePluginCreator::getPluginName() const noexcept
{
    return pluginName(mVariant);
}

char const* MoePluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* MoePluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

nvinfer1::PluginFieldCollection const* MoePluginCreator::getFieldNames() noexcept
{
    return &mCollection;
}

nvinfer1::IPluginV3* MoePluginCreator::createPlugin(
    char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    try
    {
        std::vector<FieldView> fields;
        if (fc != nullptr)
        {
            for (int32_t i = 0; i < fc->nbFields; ++i)
            {
                PluginField const& f = fc->fields[i];
                fields.push_back(FieldView{f.name, f.data, toFieldType(f.type), f.length});
            }
        }
        MoeAttrs attrs;
        std::string error;
        if (!parseFields(mVariant, fields.data(), static_cast<int32_t>(fields.size()), attrs, &error))
        {
            logMessage(ILogger::Severity::kERROR, std::string(name != nullptr ? name : pluginName(mVariant)) + ": " + error);
            return nullptr;
        }
        return new MoePlugin(mVariant, attrs);
    }
    catch (std::exception const& e)
    {
        logMessage(ILogger::Severity::kERROR, std::string("createPlugin failed: ") + e.what());
    }
    catch (...)
    {
    }
    return nullptr;
}

std::array<MoePluginCreator*, kNumVariants> const& allCreators()
{
    static MoePluginCreator plain(Variant::kPlain);
    static MoePluginCreator compressed(Variant::kCompressed);
    static MoePluginCreator sparseMixer(Variant::kSparseMixer);
    static MoePluginCreator compressedSparseMixer(Variant::kCompressedSparseMixer);
    static MoePluginCreator sigmoid(Variant::kSigmoid);
    static MoePluginCreator compressedSigmoid(Variant::kCompressedSigmoid);
    static MoePluginCreator clamped(Variant::kClamped);
    static MoePluginCreator compressedClamped(Variant::kCompressedClamped);
    static std::array<MoePluginCreator*, kNumVariants> const creators = {&plain, &compressed, &sparseMixer,
        &compressedSparseMixer, &sigmoid, &compressedSigmoid, &clamped, &compressedClamped};
    return creators;
}

} // namespace ce_trt
