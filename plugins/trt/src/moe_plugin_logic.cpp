#include "moe_plugin_logic.h"

#include "mini_json.h"

#include <algorithm>
#include <cctype>
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
    }
    return "?";
}

bool isCompressed(Variant v)
{
    return v == Variant::kCompressed || v == Variant::kCompressedSparseMixer;
}

Routing routingOf(Variant v)
{
    return v == Variant::kSparseMixer || v == Variant::kCompressedSparseMixer ? Routing::kSparseMixer
                                                                               : Routing::kSoftmaxTopK;
}

char const* routingName(Routing r)
{
    return r == Routing::kSparseMixer ? "sparsemixer" : "softmax_topk";
}

int32_t numInputs(Variant v)
{
    return isCompressed(v) ? 5 : 4;
}

std::string describeLayer(Variant v, MoeAttrs const& a)
{
    std::ostringstream out;
    out << pluginName(v) << "(top_k=" << a.topK << ", n_ce=" << a.nCe;
    if (a.routing == Routing::kSoftmaxTopK)
    {
        out << ", norm_topk_prob=" << a.normTopkProb << ", routing_scale=" << a.routingScale;
    }
    else
    {
        out << ", jitter_eps=" << a.jitterEps;
    }
    out << ")";
    return out.str();
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

DType parseDType(std::string_view name)
{
    if (!name.empty() && name.front() == '*')
    {
        name.remove_prefix(1);
    }
    if (name == "fp32")
    {
        return DType::kFP32;
    }
    if (name == "fp16")
    {
        return DType::kFP16;
    }
    if (name == "bf16")
    {
        return DType::kBF16;
    }
    if (name == "i32")
    {
        return DType::kINT32;
    }
    if (name == "i64")
    {
        return DType::kINT64;
    }
    return DType::kOther;
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
    if (routingOf(v) == Routing::kSoftmaxTopK)
    {
        fields.push_back(FieldView{kFieldTopK, nullptr, FieldType::kINT32, 1});
    }
    if (isCompressed(v))
    {
        fields.push_back(FieldView{kFieldNCe, nullptr, FieldType::kINT32, 1});
    }
    if (routingOf(v) == Routing::kSoftmaxTopK)
    {
        fields.push_back(FieldView{kFieldNormTopkProb, nullptr, FieldType::kINT32, 1});
        fields.push_back(FieldView{kFieldRoutingScale, nullptr, FieldType::kFLOAT32, 1});
    }
    else
    {
        fields.push_back(FieldView{kFieldJitterEps, nullptr, FieldType::kFLOAT32, 1});
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
    if (a.maxTokens < 0)
    {
        return setError(error, op + ": max_tokens=" + std::to_string(a.maxTokens) + " must be >= 0");
    }
    return true;
}

bool parseFields(Variant v, FieldView const* fields, int32_t count, MoeAttrs& out, std::string* error)
{
    MoeAttrs attrs;
    attrs.routing = routingOf(v);
    bool haveTopK = false;
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
        if (name == kFieldTopK || name == kFieldNCe || name == kFieldNormTopkProb)
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
            else
            {
                attrs.normTopkProb = static_cast<int32_t>(value);
            }
        }
        else if (name == kFieldJitterEps && attrs.routing == Routing::kSoftmaxTopK)
        {
            continue; // not an attribute of the softmax ops (nor serialized for them): ignored like unknown fields
        }
        else if (name == kFieldRoutingScale || name == kFieldJitterEps)
        {
            float x = 0.0f;
            if (!readFloatField(f, x, error))
            {
                return false;
            }
            (name == kFieldRoutingScale ? attrs.routingScale : attrs.jitterEps) = x;
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
    mMaxTokens = attrs.maxTokens;
    mCount = 0;
    for (FieldView const& f : creatorFieldNames(v))
    {
        std::string_view const name(f.name);
        void const* data = name == kFieldTopK ? static_cast<void const*>(&mTopK)
            : name == kFieldNCe               ? static_cast<void const*>(&mNCe)
            : name == kFieldNormTopkProb      ? static_cast<void const*>(&mNorm)
            : name == kFieldRoutingScale      ? static_cast<void const*>(&mScale)
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
    char const* const names[] = {"hidden", "router_logits", "gate_up", "down", "ces"};
    for (int32_t i = kGateUp; i < nbInputs; ++i)
    {
        if (in[i] != act)
        {
            return setError(error,
                op + ": " + names[i] + " is " + dtypeName(in[i]) + "; must be " + dtypeName(act) + " (hidden's type)");
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
    return t.type == act; // weights, ces and the output
}

// ------------------------------------------------------------------------------------------------
// Kernel library

size_t argKindSize(ArgKind k)
{
    switch (k)
    {
    case ArgKind::kPointer: return 8;
    case ArgKind::kI32: return 4;
    case ArgKind::kI64: return 8;
    case ArgKind::kU32: return 4;
    case ArgKind::kU64: return 8;
    }
    return 0;
}

namespace
{

constexpr char const* kIoBufferNames[kNumIoBuffers] = {"hidden", "router_logits", "gate_up", "down", "ces", "out"};

std::string_view trim(std::string_view s)
{
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t'))
    {
        s.remove_prefix(1);
    }
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t'))
    {
        s.remove_suffix(1);
    }
    return s;
}

bool getInt(json::Value const& obj, char const* key, int64_t& out, std::string* error, std::string const& where)
{
    json::Value const* v = obj.find(key);
    if (v == nullptr || !(v->isInt() || v->isBool()))
    {
        return setError(error, where + ": missing integer '" + key + "'");
    }
    out = v->isBool() ? (v->boolean ? 1 : 0) : v->integer;
    return true;
}

bool getString(json::Value const& obj, char const* key, std::string& out, std::string* error, std::string const& where)
{
    json::Value const* v = obj.find(key);
    if (v == nullptr || !v->isString())
    {
        return setError(error, where + ": missing string '" + key + "'");
    }
    out = v->string;
    return true;
}

std::string constexprValueText(json::Value const& v)
{
    switch (v.kind)
    {
    case json::Value::Kind::kBool: return v.boolean ? "true" : "false";
    case json::Value::Kind::kInt: return std::to_string(v.integer);
    case json::Value::Kind::kString: return "'" + v.string + "'";
    case json::Value::Kind::kFloat: return std::to_string(v.number);
    default: return "?";
    }
}

//! "[T, 3, C]" -> {"T", "3", "C"} (top-level commas only).
bool splitShape(std::string_view text, std::vector<std::string>& dims)
{
    text = trim(text);
    if (text.size() < 2 || text.front() != '[' || text.back() != ']')
    {
        return false;
    }
    text = text.substr(1, text.size() - 2);
    int depth = 0;
    size_t start = 0;
    for (size_t i = 0; i <= text.size(); ++i)
    {
        if (i == text.size() || (text[i] == ',' && depth == 0))
        {
            std::string_view const part = trim(text.substr(start, i - start));
            if (part.empty())
            {
                return false;
            }
            dims.emplace_back(part);
            start = i + 1;
        }
        else if (text[i] == '(')
        {
            ++depth;
        }
        else if (text[i] == ')')
        {
            --depth;
        }
    }
    return !dims.empty();
}

bool parseArgKind(std::string_view type, ArgKind& kind)
{
    if (!type.empty() && type.front() == '*')
    {
        kind = ArgKind::kPointer;
        return true;
    }
    if (type == "i32")
    {
        kind = ArgKind::kI32;
    }
    else if (type == "i64")
    {
        kind = ArgKind::kI64;
    }
    else if (type == "u32")
    {
        kind = ArgKind::kU32;
    }
    else if (type == "u64")
    {
        kind = ArgKind::kU64;
    }
    else
    {
        return false;
    }
    return true;
}

int32_t bufferIndex(std::string_view name, std::vector<WorkspaceSpec> const& workspace)
{
    for (int32_t i = 0; i < kNumIoBuffers; ++i)
    {
        if (name == kIoBufferNames[i])
        {
            return i;
        }
    }
    for (size_t i = 0; i < workspace.size(); ++i)
    {
        if (name == workspace[i].name)
        {
            return kNumIoBuffers + static_cast<int32_t>(i);
        }
    }
    return -1;
}

bool parseKernel(json::Value const& k, FormulaScope const& manifestScope, std::vector<WorkspaceSpec> const& workspace,
    KernelSpec& out, std::string* error)
{
    std::string where = "kernel";
    int64_t arch = 0;
    int64_t numWarps = 0;
    int64_t shared = 0;
    if (!getString(k, "stem", out.stem, error, where))
    {
        return false;
    }
    where = "kernel " + out.stem;
    if (!getInt(k, "arch", arch, error, where) || !getString(k, "entry", out.entry, error, where)
        || !getString(k, "cubin", out.cubin, error, where) || !getInt(k, "num_warps", numWarps, error, where)
        || !getInt(k, "shared", shared, error, where))
    {
        return false;
    }
    if (arch <= 0 || arch > 1000 || numWarps < 1 || numWarps > 32 || shared < 0 || shared > INT32_MAX)
    {
        return setError(error, where + ": arch, num_warps or shared out of range");
    }
    out.arch = static_cast<int32_t>(arch);
    out.numWarps = static_cast<int32_t>(numWarps);
    out.shared = static_cast<int32_t>(shared);
    if (json::Value const* t = k.find("trailing_null_params"); t != nullptr && t->isInt())
    {
        if (t->integer < 0 || t->integer > 8)
        {
            return setError(error, where + ": trailing_null_params out of range");
        }
        out.trailingNullPointers = static_cast<int32_t>(t->integer);
    }
    FormulaScope scope;
    scope.definitions = manifestScope.definitions;
    if (json::Value const* ce = k.find("constexprs"); ce != nullptr && ce->isObject())
    {
        for (auto const& [name, value] : ce->object)
        {
            out.constexprText.emplace_back(name, constexprValueText(value));
            if (value.isInt())
            {
                scope.constants[name] = value.integer;
            }
            else if (value.isBool())
            {
                scope.constants[name] = value.boolean ? 1 : 0;
            }
        }
    }
    json::Value const* grid = k.find("grid");
    if (grid == nullptr || !grid->isArray() || grid->array.empty() || grid->array.size() > 3)
    {
        return setError(error, where + ": 'grid' must be a list of 1 to 3 formulas");
    }
    for (size_t i = 0; i < 3; ++i)
    {
        std::string const text = i < grid->array.size() && grid->array[i].isString() ? grid->array[i].string
            : i < grid->array.size() && grid->array[i].isInt()                       ? std::to_string(grid->array[i].integer)
                                                                                      : std::string("1");
        std::string inner;
        if (!compileFormula(text, scope, out.grid[i], &inner))
        {
            return setError(error, where + ": grid: " + inner);
        }
    }
    json::Value const* args = k.find("args");
    if (args == nullptr || !args->isArray())
    {
        return setError(error, where + ": missing 'args'");
    }
    if (static_cast<int32_t>(args->array.size()) + out.trailingNullPointers > kMaxKernelArgs)
    {
        return setError(error, where + ": too many arguments");
    }
    for (json::Value const& a : args->array)
    {
        KernelArgSpec arg;
        std::string value;
        if (!getString(a, "name", arg.name, error, where) || !getString(a, "type", arg.type, error, where)
            || !getString(a, "value", value, error, where + " arg " + arg.name))
        {
            return false;
        }
        if (json::Value const* d = a.find("divisible_by_16"); d != nullptr && d->isBool())
        {
            arg.divisibleBy16 = d->boolean;
        }
        if (!parseArgKind(arg.type, arg.kind))
        {
            return setError(error, where + " arg " + arg.name + ": unsupported type " + arg.type);
        }
        std::string inner;
        if (arg.kind == ArgKind::kPointer)
        {
            arg.element = parseDType(arg.type);
            if (arg.element == DType::kOther)
            {
                return setError(error, where + " arg " + arg.name + ": unsupported pointer type " + arg.type);
            }
            std::string_view text = trim(value);
            size_t n = 0;
            while (n < text.size() && (std::isalnum(static_cast<unsigned char>(text[n])) || text[n] == '_'))
            {
                ++n;
            }
            std::string_view const buffer = text.substr(0, n);
            arg.buffer = bufferIndex(buffer, workspace);
            if (arg.buffer < 0)
            {
                return setError(error, where + " arg " + arg.name + ": unknown buffer '" + std::string(buffer) + "'");
            }
            std::string_view rest = trim(text.substr(n));
            std::string offset = "0";
            if (!rest.empty())
            {
                if (rest.front() != '+')
                {
                    return setError(error, where + " arg " + arg.name + ": pointer value must be 'buffer [+ offset]'");
                }
                offset = std::string(trim(rest.substr(1)));
            }
            if (!compileFormula(offset, scope, arg.value, &inner))
            {
                return setError(error, where + " arg " + arg.name + ": " + inner);
            }
        }
        else if (!compileFormula(value, scope, arg.value, &inner))
        {
            return setError(error, where + " arg " + arg.name + ": " + inner);
        }
        out.args.push_back(std::move(arg));
    }
    return true;
}

bool sameVariantExceptLogits(KernelSpec const& a, KernelSpec const& b) noexcept
{
    if (a.arch != b.arch || a.entry != b.entry || a.args.size() != b.args.size() || a.constexprText != b.constexprText
        || a.numWarps != b.numWarps)
    {
        return false;
    }
    for (size_t i = 0; i < a.args.size(); ++i)
    {
        KernelArgSpec const& x = a.args[i];
        KernelArgSpec const& y = b.args[i];
        if (x.name != y.name || x.kind != y.kind || x.buffer != y.buffer)
        {
            return false;
        }
        if (x.buffer != kBufRouterLogits && x.type != y.type)
        {
            return false;
        }
    }
    return true;
}

} // namespace

bool KernelLibrary::addManifest(std::string_view text, std::string const& source, std::string* error)
{
    json::Value root;
    std::string inner;
    if (!json::parse(text, root, &inner))
    {
        return setError(error, source + ": " + inner);
    }
    KernelSet set;
    set.source = source;
    std::string const where = source;
    json::Value const* model = root.find("model");
    if (model == nullptr || !model->isObject())
    {
        return setError(error, where + ": missing 'model'");
    }
    int64_t topK = 0;
    int64_t nCe = 0;
    int64_t norm = 0;
    if (!getInt(*model, "top_k", topK, error, where + " model") || !getInt(*model, "n_ce", nCe, error, where + " model")
        || !getInt(*model, "norm_topk_prob", norm, error, where + " model"))
    {
        return false;
    }
    if (topK < 1 || topK > 1024 || nCe < 0 || nCe >= topK)
    {
        return setError(error, where + ": model top_k / n_ce out of range");
    }
    set.topK = static_cast<int32_t>(topK);
    set.nCe = static_cast<int32_t>(nCe);
    set.normTopkProb = norm != 0;
    // Older manifests have no routing fields: softmax_topk, unscaled.
    if (json::Value const* r = model->find("routing"); r != nullptr)
    {
        if (!r->isString() || (r->string != "softmax_topk" && r->string != "sparsemixer"))
        {
            return setError(error, where + ": unknown routing (known: softmax_topk, sparsemixer)");
        }
        set.routing = r->string == "sparsemixer" ? Routing::kSparseMixer : Routing::kSoftmaxTopK;
    }
    for (auto [key, target] : {std::pair<char const*, double*>{"routing_scale", &set.routingScale},
             std::pair<char const*, double*>{"jitter_eps", &set.jitterEps}})
    {
        if (json::Value const* v = model->find(key); v != nullptr)
        {
            if (v->kind != json::Value::Kind::kFloat && v->kind != json::Value::Kind::kInt)
            {
                return setError(error, where + ": model " + key + " must be a number");
            }
            *target = v->number;
        }
    }
    if (json::Value const* ne = model->find("num_experts"); ne != nullptr && ne->isArray())
    {
        for (auto const& e : ne->array)
        {
            if (e.isInt())
            {
                set.numExperts.push_back(e.integer);
            }
        }
    }
    if (json::Value const* tv = root.find("triton_version"); tv != nullptr && tv->isString())
    {
        set.tritonVersion = tv->string;
    }

    FormulaScope scope;
    if (json::Value const* defs = root.find("definitions"); defs != nullptr && defs->isObject())
    {
        for (auto const& [name, value] : defs->object)
        {
            // "cdiv(a, b)" documents a built-in function; plain names are formulas.
            if (name.find('(') == std::string::npos && value.isString())
            {
                scope.definitions[name] = value.string;
            }
        }
    }

    json::Value const* ws = root.find("workspace");
    if (ws == nullptr || !ws->isArray())
    {
        return setError(error, where + ": missing 'workspace'");
    }
    if (ws->array.size() > static_cast<size_t>(kMaxWorkspaceBuffers))
    {
        return setError(error, where + ": more than " + std::to_string(kMaxWorkspaceBuffers) + " workspace buffers");
    }
    for (json::Value const& w : ws->array)
    {
        WorkspaceSpec spec;
        std::string shape;
        if (!getString(w, "name", spec.name, error, where + " workspace") || !getString(w, "dtype", spec.dtype, error, where + " workspace")
            || !getString(w, "shape", shape, error, where + " workspace " + spec.name))
        {
            return false;
        }
        if (spec.dtype != "model" && parseDType(spec.dtype) == DType::kOther)
        {
            return setError(error, where + " workspace " + spec.name + ": unknown dtype " + spec.dtype);
        }
        if (bufferIndex(spec.name, set.workspace) >= 0)
        {
            return setError(error, where + " workspace " + spec.name + ": duplicate or reserved name");
        }
        std::vector<std::string> dims;
        if (!splitShape(shape, dims))
        {
            return setError(error, where + " workspace " + spec.name + ": bad shape " + shape);
        }
        for (auto const& d : dims)
        {
            Formula f;
            if (!compileFormula(d, scope, f, &inner))
            {
                return setError(error, where + " workspace " + spec.name + ": " + inner);
            }
            spec.shape.push_back(std::move(f));
        }
        set.workspace.push_back(std::move(spec));
    }

    json::Value const* kernels = root.find("kernels");
    if (kernels == nullptr || !kernels->isArray())
    {
        return setError(error, where + ": missing 'kernels'");
    }
    std::set<int64_t> blockMs;
    for (json::Value const& k : kernels->array)
    {
        KernelSpec spec;
        if (!parseKernel(k, scope, set.workspace, spec, error))
        {
            if (error != nullptr)
            {
                *error = where + ": " + *error;
            }
            return false;
        }
        for (auto const& [name, value] : spec.constexprText)
        {
            if (name == "BLOCK_M")
            {
                blockMs.insert(std::strtoll(value.c_str(), nullptr, 10));
            }
        }
        if (std::find(set.archs.begin(), set.archs.end(), spec.arch) == set.archs.end())
        {
            set.archs.push_back(spec.arch);
        }
        set.kernels.push_back(std::move(spec));
    }
    if (json::Value const* table = root.find("tile_table"); table != nullptr && table->isArray())
    {
        for (json::Value const& entry : table->array)
        {
            if (json::Value const* bm = entry.find("block_m"); bm != nullptr && bm->isInt())
            {
                blockMs.insert(bm->integer);
            }
        }
    }
    for (int64_t bm : blockMs)
    {
        if (bm < 1)
        {
            return setError(error, where + ": BLOCK_M must be >= 1");
        }
    }
    set.blockMs.assign(blockMs.begin(), blockMs.end());
    if (set.blockMs.empty())
    {
        set.blockMs.push_back(1);
    }
    std::sort(set.archs.begin(), set.archs.end());

    json::Value const* plans = root.find("launch_plans");
    if (plans == nullptr || !plans->isArray() || plans->array.empty())
    {
        return setError(error, where + ": missing 'launch_plans'");
    }
    for (json::Value const& p : plans->array)
    {
        PlanSpec plan;
        std::string dtype;
        if (!getString(p, "dtype", dtype, error, where + " launch plan") || !getInt(p, "num_experts", plan.numExperts, error, where + " launch plan")
            || !getInt(p, "max_tokens", plan.maxTokens, error, where + " launch plan"))
        {
            return false;
        }
        plan.dtype = parseDType(dtype);
        if (!isActivationType(plan.dtype))
        {
            return setError(error, where + ": launch plan dtype " + dtype + " is not fp32/fp16/bf16");
        }
        json::Value const* launch = p.find("launch");
        if (launch == nullptr || !launch->isArray() || launch->array.empty()
            || launch->array.size() > static_cast<size_t>(kMaxLaunches))
        {
            return setError(error, where + ": launch plan needs 1 to " + std::to_string(kMaxLaunches) + " kernels");
        }
        for (json::Value const& stem : launch->array)
        {
            if (!stem.isString())
            {
                return setError(error, where + ": launch plan entries must be kernel stems");
            }
            plan.stems.push_back(stem.string);
        }
        for (int32_t arch : set.archs)
        {
            std::vector<int32_t> indices;
            for (auto const& stem : plan.stems)
            {
                int32_t found = -1;
                for (size_t i = 0; i < set.kernels.size(); ++i)
                {
                    if (set.kernels[i].arch == arch && set.kernels[i].stem == stem)
                    {
                        found = static_cast<int32_t>(i);
                        break;
                    }
                }
                indices.push_back(found);
            }
            plan.kernels.push_back(std::move(indices));
        }
        set.plans.push_back(std::move(plan));
    }
    std::stable_sort(set.plans.begin(), set.plans.end(), [](PlanSpec const& a, PlanSpec const& b) {
        if (a.dtype != b.dtype)
        {
            return a.dtype < b.dtype;
        }
        if (a.numExperts != b.numExperts)
        {
            return a.numExperts < b.numExperts;
        }
        return a.maxTokens < b.maxTokens;
    });
    mSets.push_back(std::move(set));
    return true;
}

std::vector<int32_t> KernelLibrary::setsFor(MoeAttrs const& attrs) const
{
    std::vector<int32_t> out;
    for (size_t s = 0; s < mSets.size(); ++s)
    {
        if (findSetIn(static_cast<int32_t>(s), attrs, -1))
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
        if (findSetIn(static_cast<int32_t>(s), attrs, numExperts))
        {
            return static_cast<int32_t>(s);
        }
    }
    return -1;
}

bool KernelLibrary::findSetIn(int32_t s, MoeAttrs const& attrs, int64_t numExperts) const
{
    KernelSet const& set = mSets[s];
    if (set.routing != attrs.routing || set.topK != attrs.topK || set.nCe != attrs.nCe)
    {
        return false;
    }
    // The routing constants are compiled into the routing kernel as fp32 constants.
    bool const constantsMatch = set.routing == Routing::kSoftmaxTopK
        ? set.normTopkProb == (attrs.normTopkProb != 0) && static_cast<float>(set.routingScale) == attrs.routingScale
        : static_cast<float>(set.jitterEps) == attrs.jitterEps;
    if (!constantsMatch)
    {
        return false;
    }
    if (numExperts < 0)
    {
        return true;
    }
    for (PlanSpec const& plan : set.plans)
    {
        if (plan.numExperts == numExperts)
        {
            return true;
        }
    }
    return false;
}

bool KernelLibrary::hasActivationType(int32_t set, DType act) const
{
    if (set < 0 || set >= static_cast<int32_t>(mSets.size()))
    {
        return false;
    }
    for (PlanSpec const& plan : mSets[set].plans)
    {
        if (plan.dtype == act)
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
    for (KernelSpec const& k : mSets[set].kernels)
    {
        for (KernelArgSpec const& a : k.args)
        {
            if (a.buffer == kBufRouterLogits && a.element == logits)
            {
                return true;
            }
        }
    }
    return false;
}

std::vector<int32_t> KernelLibrary::archs() const
{
    std::vector<int32_t> out;
    for (KernelSet const& set : mSets)
    {
        for (int32_t a : set.archs)
        {
            if (std::find(out.begin(), out.end(), a) == out.end())
            {
                out.push_back(a);
            }
        }
    }
    std::sort(out.begin(), out.end());
    return out;
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
        KernelSet const& set = mSets[s];
        std::set<std::string> dtypes;
        std::set<int64_t> experts;
        for (PlanSpec const& p : set.plans)
        {
            dtypes.insert(dtypeName(p.dtype));
            experts.insert(p.numExperts);
        }
        out << (s ? "; " : "") << routingName(set.routing) << " top_k=" << set.topK << " n_ce=" << set.nCe;
        if (set.routing == Routing::kSoftmaxTopK)
        {
            out << " norm_topk_prob=" << set.normTopkProb << " routing_scale=" << static_cast<float>(set.routingScale);
        }
        else
        {
            out << " jitter_eps=" << static_cast<float>(set.jitterEps);
        }
        out << " E={";
        bool first = true;
        for (int64_t e : experts)
        {
            out << (first ? "" : ",") << e;
            first = false;
        }
        out << "} dtypes={";
        first = true;
        for (auto const& d : dtypes)
        {
            out << (first ? "" : ",") << d;
            first = false;
        }
        out << "} sm={";
        first = true;
        for (int32_t a : set.archs)
        {
            out << (first ? "" : ",") << a;
            first = false;
        }
        out << "}";
    }
    return out.str();
}

int32_t KernelLibrary::findLogitsVariant(int32_t set, int32_t kernel, DType logits) const noexcept
{
    if (set < 0 || set >= static_cast<int32_t>(mSets.size()))
    {
        return -1;
    }
    std::vector<KernelSpec> const& kernels = mSets[set].kernels;
    if (kernel < 0 || kernel >= static_cast<int32_t>(kernels.size()))
    {
        return -1;
    }
    for (size_t i = 0; i < kernels.size(); ++i)
    {
        if (!sameVariantExceptLogits(kernels[kernel], kernels[i]))
        {
            continue;
        }
        bool matches = true;
        for (KernelArgSpec const& a : kernels[i].args)
        {
            if (a.buffer == kBufRouterLogits && a.element != logits)
            {
                matches = false;
            }
        }
        if (matches)
        {
            return static_cast<int32_t>(i);
        }
    }
    return -1;
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

void fillVars(VarValues& vars, LayerDims const& dims, int32_t topK, int32_t km, int64_t blockM)
{
    vars[static_cast<int>(Var::kT)] = dims.T;
    vars[static_cast<int>(Var::kH)] = dims.H;
    vars[static_cast<int>(Var::kI)] = dims.I;
    vars[static_cast<int>(Var::kC)] = dims.C;
    vars[static_cast<int>(Var::kE)] = dims.E;
    vars[static_cast<int>(Var::kK)] = topK;
    vars[static_cast<int>(Var::kKM)] = km;
    vars[static_cast<int>(Var::kBLOCK_M)] = blockM;
}

size_t workspaceElementSize(std::string const& dtype, DType act)
{
    return dtype == "model" ? dtypeSize(act) : dtypeSize(parseDType(dtype));
}

bool evalOrFail(Formula const& f, VarValues const& vars, int64_t& value, std::string* error, char const* what)
{
    EvalStatus const status = evalFormula(f, vars, value);
    if (status != EvalStatus::kOk)
    {
        return setError(error, std::string(what) + " '" + f.text + "': " + evalStatusName(status));
    }
    return true;
}

size_t alignUp(size_t value, size_t alignment)
{
    return (value + alignment - 1) / alignment * alignment;
}

} // namespace

bool computeWorkspace(KernelSet const& set, LayerDims const& dims, int32_t topK, int32_t km, DType act,
    WorkspaceLayout& out, std::string* error)
{
    out.count = 0;
    out.total = 0;
    if (dims.T < 0 || dims.H < 0 || dims.I < 0 || dims.E < 0 || dims.C < 0)
    {
        return setError(error, "workspace: shapes not known");
    }
    size_t offset = 0;
    for (WorkspaceSpec const& w : set.workspace)
    {
        size_t const elem = workspaceElementSize(w.dtype, act);
        uint64_t worst = 0;
        for (int64_t bm : set.blockMs)
        {
            VarValues vars{};
            fillVars(vars, dims, topK, km, bm);
            uint64_t bytes = elem;
            for (Formula const& d : w.shape)
            {
                int64_t extent = 0;
                if (!evalOrFail(d, vars, extent, error, "workspace shape"))
                {
                    return false;
                }
                if (extent < 0 || __builtin_mul_overflow(bytes, static_cast<uint64_t>(extent), &bytes))
                {
                    return setError(error, "workspace " + w.name + ": size out of range");
                }
            }
            worst = std::max(worst, bytes);
        }
        if (out.count >= kMaxWorkspaceBuffers || worst > (uint64_t{1} << 50))
        {
            return setError(error, "workspace " + w.name + ": too large");
        }
        out.offset[out.count] = offset;
        out.bytes[out.count] = static_cast<size_t>(worst);
        ++out.count;
        offset = alignUp(offset + static_cast<size_t>(worst), kWorkspaceAlignment);
    }
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
    int32_t const set = library.findSet(req.attrs, dims.E);
    if (set < 0)
    {
        return setError(error,
            describeLayer(req.variant, req.attrs) + " E=" + std::to_string(dims.E)
                + ": no AOT kernels compiled for it (embedded: " + library.describe()
                + "); rebuild the plugin with ce_kernels.aot for this model");
    }
    KernelSet const& ks = library.sets()[set];
    int32_t const km = req.attrs.topK - req.attrs.nCe;
    auto const archIt = std::find(ks.archs.begin(), ks.archs.end(), req.arch);
    if (archIt == ks.archs.end())
    {
        return setError(error, "no kernel image for sm_" + std::to_string(req.arch) + " (embedded: " + library.describe() + ")");
    }
    size_t const archIndex = static_cast<size_t>(archIt - ks.archs.begin());
    int32_t chosen = -1;
    for (size_t p = 0; p < ks.plans.size(); ++p)
    {
        PlanSpec const& plan = ks.plans[p];
        if (plan.dtype != req.activation || plan.numExperts != dims.E)
        {
            continue;
        }
        chosen = static_cast<int32_t>(p); // plans are sorted by max_tokens: the last one is the fallback
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
    PlanSpec const& plan = ks.plans[chosen];
    VarValues vars{};
    fillVars(vars, dims, req.attrs.topK, km, 0);
    for (size_t j = 0; j < plan.stems.size(); ++j)
    {
        int32_t kernel = plan.kernels[archIndex][j];
        if (kernel < 0)
        {
            return setError(error, "kernel " + plan.stems[j] + " not compiled for sm_" + std::to_string(req.arch));
        }
        bool needsVariant = false;
        for (KernelArgSpec const& a : ks.kernels[kernel].args)
        {
            needsVariant = needsVariant || (a.buffer == kBufRouterLogits && a.element != req.logits);
        }
        if (needsVariant)
        {
            int32_t const variant = library.findLogitsVariant(set, kernel, req.logits);
            if (variant < 0)
            {
                return setError(error, "no routing kernel for " + std::string(dtypeName(req.logits))
                        + " router logits like " + plan.stems[j] + " (compile ce_kernels.aot with that dtype too)");
            }
            kernel = variant;
        }
        KernelSpec const& spec = ks.kernels[kernel];
        KernelLaunch& launch = out.launches[out.numLaunches];
        launch.kernel = kernel;
        bool empty = false;
        for (int g = 0; g < 3; ++g)
        {
            int64_t extent = 0;
            if (!evalOrFail(spec.grid[g], vars, extent, error, "grid"))
            {
                return false;
            }
            int64_t const limit = g == 0 ? INT32_MAX : 65535;
            if (extent < 0 || extent > limit)
            {
                return setError(error, spec.stem + ": grid " + std::to_string(g) + " = " + std::to_string(extent)
                        + " outside 0.." + std::to_string(limit));
            }
            empty = empty || extent == 0;
            launch.grid[g] = static_cast<uint32_t>(extent);
        }
        if (empty)
        {
            continue; // like Triton's launcher: a grid with no programs is not launched
        }
        launch.block = static_cast<uint32_t>(spec.numWarps) * 32u;
        launch.shared = static_cast<uint32_t>(spec.shared);
        if (req.maxSharedBytes > 0 && spec.shared > req.maxSharedBytes)
        {
            return setError(error, spec.stem + " needs " + std::to_string(spec.shared) + " B shared memory; this device allows "
                    + std::to_string(req.maxSharedBytes) + " B per block");
        }
        int32_t n = 0;
        for (KernelArgSpec const& a : spec.args)
        {
            LaunchArg& arg = launch.args[n++];
            arg.kind = a.kind;
            int64_t value = 0;
            if (!evalOrFail(a.value, vars, value, error, "argument"))
            {
                return false;
            }
            if (a.kind == ArgKind::kPointer)
            {
                if (a.buffer == kBufCes && !isCompressed(req.variant))
                {
                    return setError(error, spec.stem + ": reads ces, which this op type does not have");
                }
                int64_t bytes = 0;
                if (value < 0 || __builtin_mul_overflow(value, static_cast<int64_t>(dtypeSize(a.element)), &bytes))
                {
                    return setError(error, spec.stem + " arg " + a.name + ": bad pointer offset");
                }
                arg.buffer = a.buffer;
                arg.value = bytes;
                arg.aligned16 = a.divisibleBy16;
                continue;
            }
            bool inRange = true;
            switch (a.kind)
            {
            case ArgKind::kI32: inRange = value >= INT32_MIN && value <= INT32_MAX; break;
            case ArgKind::kU32: inRange = value >= 0 && value <= static_cast<int64_t>(UINT32_MAX); break;
            case ArgKind::kU64: inRange = value >= 0; break;
            default: break;
            }
            if (!inRange)
            {
                return setError(error, spec.stem + " arg " + a.name + " = " + std::to_string(value) + " ('" + a.value.text
                        + "') does not fit " + a.type);
            }
            if (a.divisibleBy16 && value % 16 != 0)
            {
                return setError(error, spec.stem + " arg " + a.name + " = " + std::to_string(value) + " ('" + a.value.text
                        + "') must be a multiple of 16 (the kernel was compiled assuming it)");
            }
            arg.buffer = -1;
            arg.value = value;
            arg.aligned16 = false;
        }
        for (int32_t t = 0; t < spec.trailingNullPointers; ++t)
        {
            LaunchArg& arg = launch.args[n++];
            arg = LaunchArg{ArgKind::kPointer, -1, 0, false};
        }
        launch.numArgs = n;
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
        for (PlanSpec const& plan : library.sets()[set].plans)
        {
            for (int64_t t : {plan.maxTokens, plan.maxTokens + 1})
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
    if (!computeWorkspace(library.sets()[set], req.dims, req.attrs.topK, req.attrs.topK - req.attrs.nCe,
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
