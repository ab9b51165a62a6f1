#include "moe_plugin_logic.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <memory>
#include <set>
#include <sstream>

namespace ce_trt
{

// ------------------------------------------------------------------------------------------------
// Names and types

char const* pluginName(Variant v)
{
    switch (v)
    {
    case Variant::kPlain: return "MoE";
    case Variant::kCompressed: return "CompressedMoE";
    case Variant::kSparseMixer: return "SparseMixerMoE";
    case Variant::kCompressedSparseMixer: return "CompressedSparseMixerMoE";
    case Variant::kSigmoid: return "SigmoidMoE";
    case Variant::kCompressedSigmoid: return "CompressedSigmoidMoE";
    case Variant::kClamped: return "ClampedSwiGLUMoE";
    case Variant::kCompressedClamped: return "CompressedClampedSwiGLUMoE";
    }
    return "?";
}

bool isCompressed(Variant v)
{
    return v == Variant::kCompressed || v == Variant::kCompressedSparseMixer || v == Variant::kCompressedSigmoid
        || v == Variant::kCompressedClamped;
}

Routing routingOf(Variant v)
{
    switch (v)
    {
    case Variant::kSparseMixer:
    case Variant::kCompressedSparseMixer: return Routing::kSparseMixer;
    case Variant::kSigmoid:
    case Variant::kCompressedSigmoid: return Routing::kSigmoidTopK;
    case Variant::kPlain:
    case Variant::kCompressed:
    case Variant::kClamped:
    case Variant::kCompressedClamped: return Routing::kSoftmaxTopK;
    }
    return Routing::kSoftmaxTopK;
}

Activation activationOf(Variant v)
{
    return v == Variant::kClamped || v == Variant::kCompressedClamped ? Activation::kClampedSwiGLU
                                                                      : Activation::kSwiGLU;
}

char const* activationName(Activation a)
{
    switch (a)
    {
    case Activation::kSwiGLU: return "swiglu";
    case Activation::kClampedSwiGLU: return "clamped_swiglu";
    }
    return "?";
}

char const* routingName(Routing r)
{
    switch (r)
    {
    case Routing::kSoftmaxTopK: return "softmax_topk";
    case Routing::kSparseMixer: return "sparsemixer";
    case Routing::kSigmoidTopK: return "sigmoid_topk";
    }
    return "?";
}

int32_t numInputs(Variant v)
{
    return 4 + (isCompressed(v) ? 1 : 0) + (routingOf(v) == Routing::kSigmoidTopK ? 1 : 0)
        + (activationOf(v) == Activation::kClampedSwiGLU ? 2 : 0);
}

int32_t scoreBiasInput(Variant v)
{
    return routingOf(v) == Routing::kSigmoidTopK ? numInputs(v) - 1 : -1;
}

int32_t gateUpBiasInput(Variant v)
{
    return activationOf(v) == Activation::kClampedSwiGLU ? numInputs(v) - 2 : -1;
}

int32_t downBiasInput(Variant v)
{
    return activationOf(v) == Activation::kClampedSwiGLU ? numInputs(v) - 1 : -1;
}

BufferId inputBuffer(Variant v, int32_t input)
{
    if (input == scoreBiasInput(v))
    {
        return kBufScoreBias;
    }
    if (input == gateUpBiasInput(v))
    {
        return kBufGateUpBias;
    }
    if (input == downBiasInput(v))
    {
        return kBufDownBias;
    }
    return static_cast<BufferId>(input);
}

bool hasInputBuffer(Variant v, int32_t buffer)
{
    for (int32_t i = 0; i < numInputs(v); ++i)
    {
        if (inputBuffer(v, i) == buffer)
        {
            return true;
        }
    }
    return false;
}

namespace
{

char const* ioBufferName(int32_t buffer)
{
    switch (buffer)
    {
    case kBufHidden: return "hidden";
    case kBufRouterLogits: return "router_logits";
    case kBufGateUp: return "gate_up";
    case kBufDown: return "down";
    case kBufCes: return "ces";
    case kBufScoreBias: return "score_bias";
    case kBufGateUpBias: return "gate_up_bias";
    case kBufDownBias: return "down_bias";
    case kBufOut: return "out";
    default: break;
    }
    return "?";
}

} // namespace

char const* inputName(Variant v, int32_t input)
{
    return ioBufferName(inputBuffer(v, input));
}

namespace
{

//! The routing and activation constants of `a` as "name=value" pairs after a leading ", ".
std::string routingConstants(MoeAttrs const& a)
{
    std::ostringstream out;
    if (a.routing == Routing::kSparseMixer)
    {
        out << ", jitter_eps=" << a.jitterEps;
    }
    else
    {
        out << ", norm_topk_prob=" << a.normTopkProb << ", routing_scale=" << a.routingScale;
    }
    if (a.routing == Routing::kSigmoidTopK)
    {
        out << ", n_group=" << a.nGroup << ", topk_group=" << a.topkGroup;
    }
    if (a.activation == Activation::kClampedSwiGLU)
    {
        out << ", swiglu_alpha=" << a.swigluAlpha << ", swiglu_limit=" << a.swigluLimit;
    }
    return out.str();
}

} // namespace

std::string describeLayer(Variant v, MoeAttrs const& a)
{
    return std::string(pluginName(v)) + "(top_k=" + std::to_string(a.topK) + ", n_ce=" + std::to_string(a.nCe)
        + routingConstants(a) + ")";
}

size_t dtypeSize(DType t)
{
    switch (t)
    {
    case DType::kFP32: return 4;
    case DType::kFP16: return 2;
    case DType::kBF16: return 2;
    case DType::kINT32: return 4;
    case DType::kINT64: return 8;
    case DType::kOther: return 0;
    }
    return 0;
}

char const* dtypeName(DType t)
{
    switch (t)
    {
    case DType::kFP32: return "fp32";
    case DType::kFP16: return "fp16";
    case DType::kBF16: return "bf16";
    case DType::kINT32: return "i32";
    case DType::kINT64: return "i64";
    case DType::kOther: return "other";
    }
    return "other";
}

bool isActivationType(DType t)
{
    return t == DType::kFP32 || t == DType::kFP16 || t == DType::kBF16;
}

namespace
{

bool setError(std::string* error, std::string message)
{
    if (error != nullptr)
    {
        *error = std::move(message);
    }
    return false;
}

std::string dimsText(Shape const& s)
{
    std::string out = "[";
    for (int32_t i = 0; i < std::min(s.rank, kMaxRank); ++i)
    {
        out += (i ? ", " : "") + (s.d[i] < 0 ? std::string("?") : std::to_string(s.d[i]));
    }
    return out + "]";
}

char const* fieldTypeName(FieldType t)
{
    switch (t)
    {
    case FieldType::kINT32: return "INT32";
    case FieldType::kINT64: return "INT64";
    case FieldType::kFLOAT32: return "FLOAT32";
    case FieldType::kFLOAT64: return "FLOAT64";
    case FieldType::kCHAR: return "CHAR";
    case FieldType::kOther: return "other";
    }
    return "other";
}

bool readIntField(FieldView const& f, int64_t& value, std::string* error)
{
    if (f.data == nullptr || f.length < 1)
    {
        return setError(error, std::string("field ") + f.name + " has no value");
    }
    if (f.type == FieldType::kINT32)
    {
        int32_t v = 0;
        std::memcpy(&v, f.data, sizeof(v));
        value = v;
        return true;
    }
    if (f.type == FieldType::kINT64)
    {
        std::memcpy(&value, f.data, sizeof(value));
        return true;
    }
    return setError(error, std::string("field ") + f.name + " has type " + fieldTypeName(f.type) + ", expected INT32");
}

bool readFloatField(FieldView const& f, float& value, std::string* error)
{
    if (f.data == nullptr || f.length < 1)
    {
        return setError(error, std::string("field ") + f.name + " has no value");
    }
    if (f.type == FieldType::kFLOAT32)
    {
        std::memcpy(&value, f.data, sizeof(value));
        return true;
    }
    if (f.type == FieldType::kFLOAT64)
    {
        double v = 0.0;
        std::memcpy(&v, f.data, sizeof(v));
        value = static_cast<float>(v);
        return true;
    }
    return setError(error, std::string("field ") + f.name + " has type " + fieldTypeName(f.type) + ", expected FLOAT32");
}

} // namespace

// ------------------------------------------------------------------------------------------------
// Fields

std::vector<FieldView> creatorFieldNames(Variant v)
{
    std::vector<FieldView> fields;
    bool const sparseMixer = routingOf(v) == Routing::kSparseMixer;
    if (!sparseMixer)
    {
        fields.push_back(FieldView{kFieldTopK, nullptr, FieldType::kINT32, 1});
    }
    if (isCompressed(v))
    {
        fields.push_back(FieldView{kFieldNCe, nullptr, FieldType::kINT32, 1});
    }
    if (sparseMixer)
    {
        fields.push_back(FieldView{kFieldJitterEps, nullptr, FieldType::kFLOAT32, 1});
    }
    else
    {
        fields.push_back(FieldView{kFieldNormTopkProb, nullptr, FieldType::kINT32, 1});
        fields.push_back(FieldView{kFieldRoutingScale, nullptr, FieldType::kFLOAT32, 1});
    }
    if (routingOf(v) == Routing::kSigmoidTopK)
    {
        fields.push_back(FieldView{kFieldNGroup, nullptr, FieldType::kINT32, 1});
        fields.push_back(FieldView{kFieldTopkGroup, nullptr, FieldType::kINT32, 1});
    }
    if (activationOf(v) == Activation::kClampedSwiGLU)
    {
        fields.push_back(FieldView{kFieldSwigluAlpha, nullptr, FieldType::kFLOAT32, 1});
        fields.push_back(FieldView{kFieldSwigluLimit, nullptr, FieldType::kFLOAT32, 1});
    }
    return fields;
}

bool validateAttrs(Variant v, MoeAttrs const& a, std::string* error)
{
    std::string const op = pluginName(v);
    if (a.routing != routingOf(v))
    {
        return setError(error, op + ": routing " + routingName(a.routing) + " does not match the op type");
    }
    if (a.activation != activationOf(v))
    {
        return setError(error, op + ": activation " + activationName(a.activation) + " does not match the op type");
    }
    if (a.topK < 1)
    {
        return setError(error, op + ": top_k=" + std::to_string(a.topK) + " must be >= 1");
    }
    if (!isCompressed(v) && a.nCe != 0)
    {
        return setError(error, op + " has n_ce=" + std::to_string(a.nCe) + "; n_ce > 0 needs the Compressed op type");
    }
    if (isCompressed(v) && (a.nCe < 1 || a.nCe >= a.topK))
    {
        return setError(error,
            op + ": n_ce=" + std::to_string(a.nCe) + " outside 1.." + std::to_string(a.topK - 1) + " (top_k="
                + std::to_string(a.topK) + ")");
    }
    if (a.normTopkProb != 0 && a.normTopkProb != 1)
    {
        return setError(error, op + ": norm_topk_prob=" + std::to_string(a.normTopkProb) + " must be 0 or 1");
    }
    if (!std::isfinite(a.routingScale) || !std::isfinite(a.jitterEps) || a.jitterEps < 0.0f)
    {
        return setError(error, op + ": routing_scale must be finite and jitter_eps finite and >= 0");
    }
    if (a.routing == Routing::kSparseMixer && (a.topK != 2 || a.routingScale != 1.0f || a.normTopkProb != 0))
    {
        return setError(error, op + ": SparseMixer routing is top-2, unscaled, not renormalised (top_k="
                + std::to_string(a.topK) + ")");
    }
    if (a.routing == Routing::kSigmoidTopK && (a.nGroup < 1 || a.topkGroup < 1 || a.topkGroup > a.nGroup))
    {
        return setError(error, op + ": n_group=" + std::to_string(a.nGroup) + ", topk_group="
                + std::to_string(a.topkGroup) + " must satisfy 1 <= topk_group <= n_group");
    }
    if (a.routing != Routing::kSigmoidTopK && (a.nGroup != 1 || a.topkGroup != 1))
    {
        return setError(error, op + ": n_group / topk_group need sigmoid routing");
    }
    if (a.activation == Activation::kClampedSwiGLU && (!std::isfinite(a.swigluAlpha) || !std::isfinite(a.swigluLimit)))
    {
        return setError(error, op + ": swiglu_alpha and swiglu_limit must be finite");
    }
    if (a.activation != Activation::kClampedSwiGLU && (a.swigluAlpha != 1.0f || a.swigluLimit != 0.0f))
    {
        return setError(error, op + ": swiglu_alpha / swiglu_limit need the clamped SwiGLU");
    }
    if (a.maxTokens < 0)
    {
        return setError(error, op + ": max_tokens=" + std::to_string(a.maxTokens) + " must be >= 0");
    }
    return true;
}

bool checkExpertGroups(Variant v, MoeAttrs const& a, int64_t numExperts, std::string* error)
{
    if (routingOf(v) != Routing::kSigmoidTopK || numExperts < 0)
    {
        return true;
    }
    std::string const op = pluginName(v);
    if (a.nGroup < 1 || numExperts % a.nGroup != 0 || (a.nGroup > 1 && numExperts / a.nGroup < 2))
    {
        return setError(error, op + ": " + std::to_string(numExperts) + " experts do not split into n_group="
                + std::to_string(a.nGroup) + " equal groups" + (a.nGroup > 1 ? " of at least 2" : ""));
    }
    int64_t const kept = static_cast<int64_t>(a.topkGroup) * (numExperts / a.nGroup);
    if (a.topK > kept)
    {
        return setError(error, op + ": top_k=" + std::to_string(a.topK) + " exceeds the " + std::to_string(kept)
                + " experts of the kept groups (topk_group=" + std::to_string(a.topkGroup) + " of n_group="
                + std::to_string(a.nGroup) + ", E=" + std::to_string(numExperts) + ")");
    }
    return true;
}

bool parseFields(Variant v, FieldView const* fields, int32_t count, MoeAttrs& out, std::string* error)
{
    MoeAttrs attrs;
    attrs.routing = routingOf(v);
    attrs.activation = activationOf(v);
    bool haveTopK = false;
    bool haveAlpha = false;
    bool haveLimit = false;
    if (attrs.routing == Routing::kSparseMixer)
    {
        attrs.topK = 2;
        haveTopK = true;
    }
    for (int32_t i = 0; i < count; ++i)
    {
        FieldView const& f = fields[i];
        if (f.name == nullptr)
        {
            continue;
        }
        std::string_view const name(f.name);
        int64_t value = 0;
        bool const groupField = name == kFieldNGroup || name == kFieldTopkGroup;
        if (groupField && attrs.routing != Routing::kSigmoidTopK)
        {
            continue; // not an attribute of the other ops (nor serialized for them): ignored like unknown fields
        }
        if (name == kFieldTopK || name == kFieldNCe || name == kFieldNormTopkProb || groupField)
        {
            if (!readIntField(f, value, error))
            {
                return false;
            }
            if (value < INT32_MIN || value > INT32_MAX)
            {
                return setError(error, std::string("field ") + f.name + "=" + std::to_string(value) + " out of range");
            }
            if (name == kFieldTopK)
            {
                attrs.topK = static_cast<int32_t>(value);
                haveTopK = true;
            }
            else if (name == kFieldNCe)
            {
                attrs.nCe = static_cast<int32_t>(value);
            }
            else if (name == kFieldNGroup)
            {
                attrs.nGroup = static_cast<int32_t>(value);
            }
            else if (name == kFieldTopkGroup)
            {
                attrs.topkGroup = static_cast<int32_t>(value);
            }
            else
            {
                attrs.normTopkProb = static_cast<int32_t>(value);
            }
        }
        else if (name == kFieldJitterEps && attrs.routing != Routing::kSparseMixer)
        {
            continue; // not an attribute of the softmax / sigmoid ops (nor serialized for them): ignored
        }
        else if ((name == kFieldSwigluAlpha || name == kFieldSwigluLimit)
            && attrs.activation != Activation::kClampedSwiGLU)
        {
            continue; // not an attribute of the other ops (nor serialized for them): ignored
        }
        else if (name == kFieldRoutingScale || name == kFieldJitterEps || name == kFieldSwigluAlpha
            || name == kFieldSwigluLimit)
        {
            float x = 0.0f;
            if (!readFloatField(f, x, error))
            {
                return false;
            }
            if (name == kFieldSwigluAlpha)
            {
                attrs.swigluAlpha = x;
                haveAlpha = true;
            }
            else if (name == kFieldSwigluLimit)
            {
                attrs.swigluLimit = x;
                haveLimit = true;
            }
            else
            {
                (name == kFieldRoutingScale ? attrs.routingScale : attrs.jitterEps) = x;
            }
        }
        else if (name == kFieldMaxTokens)
        {
            if (!readIntField(f, value, error))
            {
                return false;
            }
            attrs.maxTokens = value;
        }
    }
    if (!haveTopK)
    {
        return setError(error, std::string(pluginName(v)) + ": missing field top_k");
    }
    if (attrs.activation == Activation::kClampedSwiGLU && (!haveAlpha || !haveLimit))
    {
        return setError(error, std::string(pluginName(v)) + ": missing field " + (haveAlpha ? kFieldSwigluLimit : kFieldSwigluAlpha));
    }
    if (!validateAttrs(v, attrs, error))
    {
        return false;
    }
    out = attrs;
    return true;
}

void SerializedFields::fill(Variant v, MoeAttrs const& attrs)
{
    mTopK = attrs.topK;
    mNCe = attrs.nCe;
    mNorm = attrs.normTopkProb;
    mScale = attrs.routingScale;
    mEps = attrs.jitterEps;
    mNGroup = attrs.nGroup;
    mTopkGroup = attrs.topkGroup;
    mAlpha = attrs.swigluAlpha;
    mLimit = attrs.swigluLimit;
    mMaxTokens = attrs.maxTokens;
    mCount = 0;
    for (FieldView const& f : creatorFieldNames(v))
    {
        std::string_view const name(f.name);
        void const* data = name == kFieldTopK ? static_cast<void const*>(&mTopK)
            : name == kFieldNCe               ? static_cast<void const*>(&mNCe)
            : name == kFieldNormTopkProb      ? static_cast<void const*>(&mNorm)
            : name == kFieldRoutingScale      ? static_cast<void const*>(&mScale)
            : name == kFieldNGroup            ? static_cast<void const*>(&mNGroup)
            : name == kFieldTopkGroup         ? static_cast<void const*>(&mTopkGroup)
            : name == kFieldSwigluAlpha       ? static_cast<void const*>(&mAlpha)
            : name == kFieldSwigluLimit       ? static_cast<void const*>(&mLimit)
                                              : static_cast<void const*>(&mEps);
        mViews[mCount++] = FieldView{f.name, data, f.type, 1};
    }
    mViews[mCount++] = FieldView{kFieldMaxTokens, &mMaxTokens, FieldType::kINT64, 1};
}

// ------------------------------------------------------------------------------------------------
// Shapes and types

Shape Shape::of(std::initializer_list<int64_t> dims)
{
    Shape s;
    for (int64_t d : dims)
    {
        if (s.rank < kMaxRank)
        {
            s.d[s.rank++] = d;
        }
    }
    return s;
}

namespace
{

//! Unifies two maybe-unknown extents; false when both are known and differ.
bool unify(int64_t& target, int64_t value)
{
    if (value < 0)
    {
        return true;
    }
    if (target < 0)
    {
        target = value;
        return true;
    }
    return target == value;
}

} // namespace

bool checkShapes(Variant v, Shape const* in, int32_t nbInputs, LayerDims& dims, std::string* error)
{
    std::string const op = pluginName(v);
    if (nbInputs != numInputs(v))
    {
        return setError(error,
            op + " takes " + std::to_string(numInputs(v)) + " inputs, got " + std::to_string(nbInputs));
    }
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        for (int32_t d = 0; d < std::min(in[i].rank, kMaxRank); ++d)
        {
            if (in[i].d[d] < -1)
            {
                return setError(error, op + ": input " + std::to_string(i) + " " + dimsText(in[i])
                        + " has a negative dimension (-1 is the only unknown extent)");
            }
        }
    }
    Shape const& hidden = in[kHidden];
    Shape const& logits = in[kRouterLogits];
    Shape const& gateUp = in[kGateUp];
    Shape const& down = in[kDown];
    if (hidden.rank < 2 || hidden.rank > kMaxRank)
    {
        return setError(error, op + ": hidden " + dimsText(hidden) + " must be [T, H] (rank >= 2)");
    }
    if (logits.rank != hidden.rank)
    {
        return setError(error, op + ": router_logits " + dimsText(logits) + " and hidden " + dimsText(hidden)
                + " differ in rank");
    }
    if (gateUp.rank != 3 || down.rank != 3)
    {
        return setError(error, op + ": gate_up " + dimsText(gateUp) + " and down " + dimsText(down) + " must be rank 3");
    }
    LayerDims out;
    int64_t tokens = 1;
    for (int32_t i = 0; i + 1 < hidden.rank; ++i)
    {
        int64_t lead = hidden.d[i];
        if (!unify(lead, logits.d[i]))
        {
            return setError(error, op + ": router_logits " + dimsText(logits) + " and hidden " + dimsText(hidden)
                    + " differ in leading dims");
        }
        if (lead < 0 || tokens < 0)
        {
            tokens = -1;
        }
        else if (__builtin_mul_overflow(tokens, lead, &tokens))
        {
            return setError(error, op + ": token count overflows");
        }
    }
    out.T = tokens;
    out.H = hidden.d[hidden.rank - 1];
    out.E = logits.d[logits.rank - 1];
    bool ok = unify(out.E, gateUp.d[0]) && unify(out.E, down.d[0]) && unify(out.H, gateUp.d[2])
        && unify(out.H, down.d[1]);
    out.I = down.d[2];
    if (gateUp.d[1] >= 0)
    {
        if (gateUp.d[1] % 2 != 0)
        {
            return setError(error, op + ": gate_up " + dimsText(gateUp) + " second dim must be 2I (even)");
        }
        ok = ok && unify(out.I, gateUp.d[1] / 2);
    }
    if (!ok)
    {
        return setError(error,
            op + ": inconsistent shapes: hidden " + dimsText(hidden) + ", router_logits " + dimsText(logits)
                + ", gate_up " + dimsText(gateUp) + " (want [E, 2I, H]), down " + dimsText(down) + " (want [E, H, I])");
    }
    out.C = 0;
    if (isCompressed(v))
    {
        Shape const& ces = in[kCes];
        if (ces.rank != 3 || (ces.d[1] >= 0 && ces.d[1] != 3) || !unify(out.E, ces.d[0]))
        {
            return setError(error, op + ": ces " + dimsText(ces) + " must be [E, 3, C] with E = " + std::to_string(out.E));
        }
        out.C = ces.d[2];
        if (out.C >= 0 && ((out.H >= 0 && out.C < out.H) || (out.I >= 0 && out.C < out.I)))
        {
            return setError(error, op + ": ces " + dimsText(ces) + " last dim must be >= max(H, I) = "
                    + std::to_string(std::max(out.H, out.I)));
        }
    }
    int32_t const biasInput = scoreBiasInput(v);
    if (biasInput >= 0)
    {
        Shape const& bias = in[biasInput];
        if (bias.rank != 1 || !unify(out.E, bias.d[0]))
        {
            return setError(error, op + ": score_bias " + dimsText(bias) + " must be [E] with E = " + std::to_string(out.E));
        }
    }
    if (activationOf(v) == Activation::kClampedSwiGLU)
    {
        Shape const& gateUpBias = in[gateUpBiasInput(v)];
        Shape const& downBias = in[downBiasInput(v)];
        bool biasesOk = gateUpBias.rank == 2 && downBias.rank == 2 && unify(out.E, gateUpBias.d[0])
            && unify(out.E, downBias.d[0]) && unify(out.H, downBias.d[1]);
        if (biasesOk && gateUpBias.d[1] >= 0)
        {
            biasesOk = gateUpBias.d[1] % 2 == 0 && unify(out.I, gateUpBias.d[1] / 2);
        }
        if (!biasesOk)
        {
            return setError(error, op + ": gate_up_bias " + dimsText(gateUpBias) + " and down_bias " + dimsText(downBias)
                    + " must be [E, 2I] and [E, H] with E = " + std::to_string(out.E) + ", I = " + std::to_string(out.I)
                    + ", H = " + std::to_string(out.H));
        }
    }
    if (out.E == 0)
    {
        return setError(error, op + ": no experts (E = 0)");
    }
    struct Named
    {
        char const* name;
        int64_t value;
    };
    for (Named const n : {Named{"H", out.H}, Named{"I", out.I}, Named{"C", isCompressed(v) ? out.C : -1}})
    {
        if (n.value == 0 || (n.value > 0 && n.value % 16 != 0))
        {
            return setError(error, op + ": " + n.name + " = " + std::to_string(n.value)
                    + " must be a positive multiple of 16 (the AOT kernels assume it)");
        }
    }
    dims = out;
    return true;
}

Shape outputShape(Shape const& hidden)
{
    return hidden;
}

bool checkTypes(Variant v, DType const* in, int32_t nbInputs, std::string* error)
{
    std::string const op = pluginName(v);
    if (nbInputs != numInputs(v))
    {
        return setError(error,
            op + " takes " + std::to_string(numInputs(v)) + " inputs, got " + std::to_string(nbInputs));
    }
    DType const act = in[kHidden];
    if (!isActivationType(act))
    {
        return setError(error, op + ": hidden is " + dtypeName(act) + "; supported: fp32, fp16, bf16");
    }
    if (in[kRouterLogits] != act && in[kRouterLogits] != DType::kFP32)
    {
        return setError(error, op + ": router_logits is " + dtypeName(in[kRouterLogits]) + "; must be fp32 or "
                + dtypeName(act) + " (hidden's type)");
    }
    int32_t const biasInput = scoreBiasInput(v);
    if (biasInput >= 0 && in[biasInput] != DType::kFP32)
    {
        return setError(error, op + ": score_bias is " + dtypeName(in[biasInput]) + "; must be fp32");
    }
    for (int32_t i = kGateUp; i < nbInputs; ++i)
    {
        if (i != biasInput && in[i] != act)
        {
            return setError(error, op + ": " + inputName(v, i) + " is " + dtypeName(in[i]) + "; must be "
                    + dtypeName(act) + " (hidden's type)");
        }
    }
    return true;
}

DType outputType(DType const* in, int32_t nbInputs)
{
    return nbInputs > 0 ? in[kHidden] : DType::kOther;
}

bool supportsCombination(Variant v, MoeAttrs const& attrs, int32_t pos, TensorTypeFormat const* inOut,
    int32_t nbInputs, int32_t nbOutputs, KernelLibrary const* library)
{
    if (nbInputs != numInputs(v) || nbOutputs != kNumOutputs || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    TensorTypeFormat const& t = inOut[pos];
    if (!t.linear)
    {
        return false;
    }
    int32_t const set = library != nullptr ? library->findSet(attrs, -1) : -1;
    if (pos == kHidden)
    {
        return isActivationType(t.type) && (set < 0 || library->hasActivationType(set, t.type));
    }
    DType const act = inOut[kHidden].type;
    if (pos == kRouterLogits)
    {
        if (t.type != act && t.type != DType::kFP32)
        {
            return false;
        }
        return set < 0 || library->hasLogitsType(set, act, t.type);
    }
    if (pos == scoreBiasInput(v))
    {
        return t.type == DType::kFP32;
    }
    return t.type == act; // weights, ces, expert biases and the output
}

// ------------------------------------------------------------------------------------------------
// Kernel library

bool sameLayer(MoeAttrs const& compiled, MoeAttrs const& attrs)
{
    if (compiled.routing != attrs.routing || compiled.topK != attrs.topK || compiled.nCe != attrs.nCe
        || compiled.activation != attrs.activation)
    {
        return false;
    }
    // The clamped SwiGLU's constants are compiled into the gate/up GEMM as fp32 constants.
    if (compiled.activation == Activation::kClampedSwiGLU
        && (compiled.swigluAlpha != attrs.swigluAlpha || compiled.swigluLimit != attrs.swigluLimit))
    {
        return false;
    }
    // The routing constants are compiled into the routing kernel as fp32 constants.
    if (compiled.routing == Routing::kSparseMixer)
    {
        return compiled.jitterEps == attrs.jitterEps;
    }
    bool const groups
        = compiled.routing != Routing::kSigmoidTopK || (compiled.nGroup == attrs.nGroup && compiled.topkGroup == attrs.topkGroup);
    return compiled.normTopkProb == attrs.normTopkProb && compiled.routingScale == attrs.routingScale && groups;
}

namespace
{

bool hasExperts(KernelSetDesc const& set, int64_t numExperts)
{
    for (int32_t p = 0; p < set.numPlans; ++p)
    {
        if (set.plans[p].numExperts == numExperts)
        {
            return true;
        }
    }
    return false;
}

template <typename T>
std::string joined(std::set<T> const& values)
{
    std::ostringstream out;
    bool first = true;
    for (T const& v : values)
    {
        out << (first ? "" : ",") << v;
        first = false;
    }
    return out.str();
}

} // namespace

std::vector<int32_t> KernelLibrary::setsFor(MoeAttrs const& attrs) const
{
    std::vector<int32_t> out;
    for (size_t s = 0; s < mSets.size(); ++s)
    {
        if (sameLayer(mSets[s]->layer(), attrs))
        {
            out.push_back(static_cast<int32_t>(s));
        }
    }
    return out;
}

int32_t KernelLibrary::findSet(MoeAttrs const& attrs, int64_t numExperts) const
{
    for (size_t s = 0; s < mSets.size(); ++s)
    {
        if (sameLayer(mSets[s]->layer(), attrs) && (numExperts < 0 || hasExperts(*mSets[s], numExperts)))
        {
            return static_cast<int32_t>(s);
        }
    }
    return -1;
}

bool KernelLibrary::hasActivationType(int32_t set, DType act) const
{
    if (set < 0 || set >= static_cast<int32_t>(mSets.size()))
    {
        return false;
    }
    for (int32_t p = 0; p < mSets[set]->numPlans; ++p)
    {
        if (mSets[set]->plans[p].dtype == act)
        {
            return true;
        }
    }
    return false;
}

bool KernelLibrary::hasLogitsType(int32_t set, DType act, DType logits) const
{
    if (!hasActivationType(set, act))
    {
        return false;
    }
    if (logits == act)
    {
        return true;
    }
    KernelSetDesc const& ks = *mSets[set];
    for (int32_t k = 0; k < ks.numKernels; ++k)
    {
        if (ks.kernels[k].logits == logits)
        {
            return true;
        }
    }
    return false;
}

std::vector<int32_t> KernelLibrary::archs() const
{
    std::set<int32_t> all;
    for (KernelSetDesc const* set : mSets)
    {
        all.insert(set->archs, set->archs + set->numArchs);
    }
    return std::vector<int32_t>(all.begin(), all.end());
}

std::string KernelLibrary::describe() const
{
    if (mSets.empty())
    {
        return "no kernels embedded";
    }
    std::ostringstream out;
    for (size_t s = 0; s < mSets.size(); ++s)
    {
        KernelSetDesc const& set = *mSets[s];
        MoeAttrs const layer = set.layer();
        std::set<std::string> dtypes;
        std::set<int64_t> experts;
        for (int32_t p = 0; p < set.numPlans; ++p)
        {
            dtypes.insert(dtypeName(set.plans[p].dtype));
            experts.insert(set.plans[p].numExperts);
        }
        out << (s ? "; " : "") << routingName(layer.routing) << " top_k=" << layer.topK << " n_ce=" << layer.nCe;
        if (layer.routing == Routing::kSparseMixer)
        {
            out << " jitter_eps=" << layer.jitterEps;
        }
        else
        {
            out << " norm_topk_prob=" << layer.normTopkProb << " routing_scale=" << layer.routingScale;
        }
        if (layer.routing == Routing::kSigmoidTopK)
        {
            out << " n_group=" << layer.nGroup << " topk_group=" << layer.topkGroup;
        }
        if (layer.activation == Activation::kClampedSwiGLU)
        {
            out << " clamped_swiglu swiglu_alpha=" << layer.swigluAlpha << " swiglu_limit=" << layer.swigluLimit;
        }
        out << " E={" << joined(experts) << "} dtypes={" << joined(dtypes) << "} sm={"
            << joined(std::set<int32_t>(set.archs, set.archs + set.numArchs)) << "}";
    }
    return out.str();
}

int32_t selectArch(std::vector<int32_t> const& available, int32_t cc)
{
    int32_t best = -1;
    for (int32_t a : available)
    {
        if (a == cc)
        {
            return a;
        }
        // Below 90, a cubin runs on later minors of its major; 90 and up are arch-specific targets.
        if (a < 90 && a / 10 == cc / 10 && a < cc && a > best)
        {
            best = a;
        }
    }
    return best;
}


// ------------------------------------------------------------------------------------------------
// Workspace and launch plan

namespace
{

Dims dimsOf(LayerDims const& dims, int32_t topK, int32_t km)
{
    return Dims{dims.T, dims.H, dims.I, dims.C, dims.E, topK, km};
}

size_t alignUp(size_t value, size_t alignment)
{
    return (value + alignment - 1) / alignment * alignment;
}

char const* argKindName(ArgKind k)
{
    return k == ArgKind::kU32 ? "u32" : k == ArgKind::kI32 ? "i32" : "pointer";
}

} // namespace

bool computeWorkspace(KernelSetDesc const& set, LayerDims const& dims, int32_t topK, int32_t km, DType act,
    WorkspaceLayout& out, std::string* error)
{
    out.count = 0;
    out.total = 0;
    if (dims.T < 0 || dims.H < 0 || dims.I < 0 || dims.E < 0 || dims.C < 0)
    {
        return setError(error, "workspace: shapes not known");
    }
    if (set.numWorkspace > kMaxWorkspaceBuffers)
    {
        return setError(error, "workspace: too many buffers");
    }
    std::array<Int, kMaxWorkspaceBuffers> elements{};
    set.workspaceElements(dimsOf(dims, topK, km), elements.data());
    size_t offset = 0;
    for (int32_t i = 0; i < set.numWorkspace; ++i)
    {
        WorkspaceDesc const& w = set.workspace[i];
        Int const bytes = elements[i] * static_cast<int64_t>(w.elementBytes > 0 ? w.elementBytes : dtypeSize(act));
        if (!bytes.ok || bytes.v < 0 || bytes.v > (int64_t{1} << 50))
        {
            return setError(error, std::string("workspace ") + w.name + ": size out of range");
        }
        out.offset[i] = offset;
        out.bytes[i] = static_cast<size_t>(bytes.v);
        offset = alignUp(offset + out.bytes[i], kWorkspaceAlignment);
    }
    out.count = set.numWorkspace;
    out.total = offset;
    return true;
}

bool buildLaunchPlan(KernelLibrary const& library, PlanRequest const& req, LaunchPlan& out, std::string* error)
{
    out.numLaunches = 0;
    out.set = -1;
    out.plan = -1;
    out.arch = req.arch;
    out.tokens = req.dims.T;
    if (!validateAttrs(req.variant, req.attrs, error))
    {
        return false;
    }
    LayerDims const& dims = req.dims;
    if (dims.T < 0 || dims.H <= 0 || dims.I <= 0 || dims.E <= 0 || dims.C < 0)
    {
        return setError(error, "launch plan: shapes not known");
    }
    if (!checkExpertGroups(req.variant, req.attrs, dims.E, error))
    {
        return false;
    }
    int32_t const set = library.findSet(req.attrs, dims.E);
    if (set < 0)
    {
        return setError(error,
            describeLayer(req.variant, req.attrs) + " E=" + std::to_string(dims.E)
                + ": no AOT kernels compiled for it (embedded: " + library.describe()
                + "); rebuild the plugin with ce_kernels.aot for this model");
    }
    KernelSetDesc const& ks = library.set(set);
    int32_t const km = req.attrs.topK - req.attrs.nCe;
    if (std::find(ks.archs, ks.archs + ks.numArchs, req.arch) == ks.archs + ks.numArchs)
    {
        return setError(error, "no kernel image for sm_" + std::to_string(req.arch) + " (embedded: " + library.describe() + ")");
    }
    int32_t chosen = -1;
    for (int32_t p = 0; p < ks.numPlans; ++p)
    {
        PlanDesc const& plan = ks.plans[p];
        if (plan.dtype != req.activation || plan.numExperts != dims.E)
        {
            continue;
        }
        chosen = p; // plans are sorted by max_tokens: the last one is the fallback
        if (dims.T <= plan.maxTokens)
        {
            break;
        }
    }
    if (chosen < 0)
    {
        return setError(error, std::string("no AOT kernels for activations ") + dtypeName(req.activation) + " with E="
                + std::to_string(dims.E) + " (embedded: " + library.describe() + ")");
    }
    out.set = set;
    out.plan = chosen;
    if (!computeWorkspace(ks, dims, req.attrs.topK, km, req.activation, out.workspace, error))
    {
        return false;
    }
    if (dims.T == 0)
    {
        return true; // nothing to launch
    }
    PlanDesc const& plan = ks.plans[chosen];
    Dims const d = dimsOf(dims, req.attrs.topK, km);
    for (int32_t j = 0; j < plan.numLaunches; ++j)
    {
        int32_t kernel = plan.launches[j];
        if (ks.kernels[kernel].logits != DType::kOther && ks.kernels[kernel].logits != req.logits)
        {
            int32_t const twin = ks.kernels[kernel].logitsTwin;
            if (twin < 0 || ks.kernels[twin].logits != req.logits)
            {
                return setError(error, "no routing kernel for " + std::string(dtypeName(req.logits))
                        + " router logits like " + ks.kernels[kernel].stem + " (compile ce_kernels.aot with that dtype too)");
            }
            kernel = twin;
        }
        KernelDesc const& spec = ks.kernels[kernel];
        int32_t image = -1;
        for (int32_t i = 0; i < spec.numImages; ++i)
        {
            image = spec.images[i].arch == req.arch ? i : image;
        }
        if (image < 0)
        {
            return setError(error, std::string("kernel ") + spec.stem + " not compiled for sm_" + std::to_string(req.arch));
        }
        KernelLaunch& launch = out.launches[out.numLaunches];
        launch.kernel = kernel;
        launch.image = image;
        Grid const grid = spec.grid(d);
        bool empty = false;
        for (int g = 0; g < 3; ++g)
        {
            int64_t const limit = g == 0 ? INT32_MAX : 65535;
            if (!grid[g].ok || grid[g].v < 0 || grid[g].v > limit)
            {
                return setError(error, std::string(spec.stem) + ": grid " + std::to_string(g) + " = "
                        + (grid[g].ok ? std::to_string(grid[g].v) : std::string("overflow")) + " outside 0.."
                        + std::to_string(limit));
            }
            empty = empty || grid[g].v == 0;
            launch.grid[g] = static_cast<uint32_t>(grid[g].v);
        }
        if (empty)
        {
            continue; // like Triton's launcher: a grid with no programs is not launched
        }
        int32_t const shared = spec.images[image].shared;
        launch.block = static_cast<uint32_t>(spec.numWarps) * 32u;
        launch.shared = static_cast<uint32_t>(shared);
        if (req.maxSharedBytes > 0 && shared > req.maxSharedBytes)
        {
            return setError(error, std::string(spec.stem) + " needs " + std::to_string(shared)
                    + " B shared memory; this device allows " + std::to_string(req.maxSharedBytes) + " B per block");
        }
        std::array<ArgValue, kMaxKernelArgs> values;
        int32_t const count = spec.args(d, values.data());
        if (count + spec.scratchPointers > kMaxKernelArgs)
        {
            return setError(error, std::string(spec.stem) + ": too many arguments");
        }
        for (int32_t a = 0; a < count; ++a)
        {
            ArgValue const& v = values[a];
            LaunchArg& arg = launch.args[a];
            arg.kind = v.kind;
            if (v.kind == ArgKind::kPointer)
            {
                if (v.buffer < kBufOut && !hasInputBuffer(req.variant, v.buffer))
                {
                    return setError(error, std::string(spec.stem) + ": reads " + ioBufferName(v.buffer)
                            + ", which this op type does not have");
                }
                if (!v.value.ok || v.value.v < 0)
                {
                    return setError(error, std::string(spec.stem) + " arg " + v.name + ": bad pointer offset");
                }
                arg.buffer = v.buffer;
                arg.value = v.value.v;
                arg.aligned16 = v.divisibleBy16;
                continue;
            }
            bool const inRange = v.value.ok
                && (v.kind == ArgKind::kI32 ? v.value.v >= INT32_MIN && v.value.v <= INT32_MAX
                                            : v.value.v >= 0 && v.value.v <= static_cast<int64_t>(UINT32_MAX));
            if (!inRange)
            {
                return setError(error, std::string(spec.stem) + " arg " + v.name + " = "
                        + (v.value.ok ? std::to_string(v.value.v) : std::string("overflow")) + " does not fit "
                        + argKindName(v.kind));
            }
            if (v.divisibleBy16 && v.value.v % 16 != 0)
            {
                return setError(error, std::string(spec.stem) + " arg " + v.name + " = " + std::to_string(v.value.v)
                        + " must be a multiple of 16 (the kernel was compiled assuming it)");
            }
            arg.buffer = -1;
            arg.value = v.value.v;
            arg.aligned16 = false;
        }
        for (int32_t t = 0; t < spec.scratchPointers; ++t)
        {
            launch.args[count + t] = LaunchArg{ArgKind::kPointer, -1, 0, false};
        }
        launch.numArgs = count + spec.scratchPointers;
        ++out.numLaunches;
    }
    return true;
}

bool checkTokenRange(KernelLibrary const& library, PlanRequest const& request, int64_t tMin, int64_t tMax,
    std::vector<int32_t> const& archs, std::string* error)
{
    if (tMin < 0 || tMax < tMin)
    {
        return setError(error, "token range " + std::to_string(tMin) + ".." + std::to_string(tMax) + " is invalid");
    }
    if (archs.empty())
    {
        return setError(error, "no GPU architecture to check (embedded: " + library.describe() + ")");
    }
    std::vector<int64_t> tokens = {std::max<int64_t>(tMin, 1), tMax};
    int32_t const set = library.findSet(request.attrs, request.dims.E);
    if (set >= 0)
    {
        KernelSetDesc const& ks = library.set(set);
        for (int32_t p = 0; p < ks.numPlans; ++p)
        {
            for (int64_t t : {ks.plans[p].maxTokens, ks.plans[p].maxTokens + 1})
            {
                if (t > tMin && t < tMax)
                {
                    tokens.push_back(t);
                }
            }
        }
    }
    auto plan = std::make_unique<LaunchPlan>();
    for (int32_t arch : archs)
    {
        for (int64_t t : tokens)
        {
            if (t > tMax)
            {
                continue;
            }
            PlanRequest req = request;
            req.arch = arch;
            req.dims.T = t;
            std::string inner;
            if (!buildLaunchPlan(library, req, *plan, &inner))
            {
                return setError(error, "T=" + std::to_string(t) + " on sm_" + std::to_string(arch) + ": " + inner);
            }
        }
    }
    return true;
}

size_t workspaceBytes(KernelLibrary const& library, PlanRequest const& req, std::string* error)
{
    int32_t const set = library.findSet(req.attrs, req.dims.E);
    if (set < 0)
    {
        setError(error, "no AOT kernels for this layer (embedded: " + library.describe() + ")");
        return 0;
    }
    WorkspaceLayout layout;
    if (!computeWorkspace(library.set(set), req.dims, req.attrs.topK, req.attrs.topK - req.attrs.nCe,
            req.activation, layout, error))
    {
        return 0;
    }
    return layout.total;
}

bool resolvePointer(LaunchArg const& arg, uint64_t const* bufferBase, uint64_t& address) noexcept
{
    if (arg.buffer < 0)
    {
        address = 0;
        return true;
    }
    if (arg.buffer >= kMaxBuffers)
    {
        return false;
    }
    uint64_t const base = bufferBase[arg.buffer];
    if (base == 0)
    {
        return false;
    }
    address = base + static_cast<uint64_t>(arg.value);
    return !arg.aligned16 || address % 16 == 0;
}

} // namespace ce_trt
