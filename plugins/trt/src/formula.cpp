#include "formula.h"

#include <cctype>

namespace ce_trt
{

namespace
{

constexpr char const* kVarNames[kVarCount] = {"T", "H", "I", "C", "E", "K", "KM", "BLOCK_M"};
constexpr int kMaxStack = 32;
constexpr int kMaxExpansionDepth = 8;
constexpr int kMaxNesting = 64; // parentheses, calls and unary minus: the parser recurses on each

class Compiler
{
public:
    Compiler(std::string_view text, FormulaScope const& scope, std::vector<FormulaOp>& ops, int depth)
        : mText(text)
        , mScope(scope)
        , mOps(ops)
        , mDepth(depth)
    {
    }

    bool run(std::string* error)
    {
        if (!expr())
        {
            return fail(error);
        }
        skipSpace();
        if (mPos != mText.size())
        {
            mMessage = "unexpected '" + std::string(1, mText[mPos]) + "'";
            return fail(error);
        }
        return true;
    }

private:
    bool fail(std::string* error) const
    {
        if (error != nullptr)
        {
            *error = "formula '" + std::string(mText) + "': " + mMessage;
        }
        return false;
    }

    bool setError(std::string message)
    {
        if (mMessage.empty())
        {
            mMessage = std::move(message);
        }
        return false;
    }

    void skipSpace()
    {
        while (mPos < mText.size() && std::isspace(static_cast<unsigned char>(mText[mPos])))
        {
            ++mPos;
        }
    }

    bool accept(std::string_view token)
    {
        skipSpace();
        if (mText.substr(mPos, token.size()) == token)
        {
            mPos += token.size();
            return true;
        }
        return false;
    }

    void emit(FormulaOp::Code code, int64_t value = 0)
    {
        mOps.push_back(FormulaOp{code, value});
    }

    bool expr()
    {
        if (!term())
        {
            return false;
        }
        while (true)
        {
            if (accept("+"))
            {
                if (!term())
                {
                    return false;
                }
                emit(FormulaOp::Code::kAdd);
            }
            else if (accept("-"))
            {
                if (!term())
                {
                    return false;
                }
                emit(FormulaOp::Code::kSub);
            }
            else
            {
                return true;
            }
        }
    }

    bool term()
    {
        if (!unary())
        {
            return false;
        }
        while (true)
        {
            if (accept("//"))
            {
                if (!unary())
                {
                    return false;
                }
                emit(FormulaOp::Code::kFloorDiv);
            }
            else if (accept("*"))
            {
                if (!unary())
                {
                    return false;
                }
                emit(FormulaOp::Code::kMul);
            }
            else if (accept("%"))
            {
                if (!unary())
                {
                    return false;
                }
                emit(FormulaOp::Code::kMod);
            }
            else
            {
                skipSpace();
                if (mPos < mText.size() && mText[mPos] == '/')
                {
                    return setError("'/' is not integer division (use '//')");
                }
                return true;
            }
        }
    }

    //! Counts one level of the parser's recursion for its scope; false when too deep.
    struct Nested
    {
        explicit Nested(Compiler& compiler)
            : mCompiler(compiler)
        {
            ++mCompiler.mNesting;
        }
        ~Nested()
        {
            --mCompiler.mNesting;
        }
        bool ok() const
        {
            return mCompiler.mNesting <= kMaxNesting || mCompiler.setError("nested too deeply");
        }
        Compiler& mCompiler;
    };

    bool unary()
    {
        if (accept("-"))
        {
            Nested const nested(*this);
            if (!nested.ok() || !unary())
            {
                return false;
            }
            emit(FormulaOp::Code::kNeg);
            return true;
        }
        return atom();
    }

    bool atom()
    {
        skipSpace();
        if (mPos >= mText.size())
        {
            return setError("unexpected end");
        }
        char const c = mText[mPos];
        if (c == '(')
        {
            ++mPos;
            Nested const nested(*this);
            if (!nested.ok() || !expr())
            {
                return false;
            }
            return accept(")") ? true : setError("missing ')'");
        }
        if (std::isdigit(static_cast<unsigned char>(c)))
        {
            int64_t value = 0;
            while (mPos < mText.size() && std::isdigit(static_cast<unsigned char>(mText[mPos])))
            {
                int64_t const digit = mText[mPos] - '0';
                if (__builtin_mul_overflow(value, int64_t{10}, &value) || __builtin_add_overflow(value, digit, &value))
                {
                    return setError("integer literal too large");
                }
                ++mPos;
            }
            emit(FormulaOp::Code::kConst, value);
            return true;
        }
        if (std::isalpha(static_cast<unsigned char>(c)) || c == '_')
        {
            size_t const start = mPos;
            while (mPos < mText.size() && (std::isalnum(static_cast<unsigned char>(mText[mPos])) || mText[mPos] == '_'))
            {
                ++mPos;
            }
            std::string_view const name = mText.substr(start, mPos - start);
            if (accept("("))
            {
                return call(name);
            }
            return identifier(name);
        }
        return setError("unexpected '" + std::string(1, c) + "'");
    }

    bool call(std::string_view name)
    {
        Nested const nested(*this);
        if (!nested.ok())
        {
            return false;
        }
        int64_t count = 0;
        do
        {
            if (!expr())
            {
                return false;
            }
            ++count;
        } while (accept(","));
        if (!accept(")"))
        {
            return setError("missing ')' after arguments of " + std::string(name));
        }
        if (name == "cdiv")
        {
            if (count != 2)
            {
                return setError("cdiv takes 2 arguments");
            }
            emit(FormulaOp::Code::kCdiv);
            return true;
        }
        if (name == "min" || name == "max")
        {
            emit(name == "min" ? FormulaOp::Code::kMin : FormulaOp::Code::kMax, count);
            return true;
        }
        return setError("unknown function " + std::string(name));
    }

    bool identifier(std::string_view name)
    {
        if (auto const it = mScope.constants.find(name); it != mScope.constants.end())
        {
            emit(FormulaOp::Code::kConst, it->second);
            return true;
        }
        if (auto const it = mScope.definitions.find(name); it != mScope.definitions.end())
        {
            if (mDepth >= kMaxExpansionDepth)
            {
                return setError("definitions nest too deep at " + std::string(name));
            }
            std::string inner;
            Compiler nested(it->second, mScope, mOps, mDepth + 1);
            if (!nested.run(&inner))
            {
                return setError("in definition of " + std::string(name) + ": " + inner);
            }
            return true;
        }
        for (int v = 0; v < kVarCount; ++v)
        {
            if (name == kVarNames[v])
            {
                emit(FormulaOp::Code::kVar, v);
                return true;
            }
        }
        return setError("unknown name " + std::string(name));
    }

    std::string_view mText;
    FormulaScope const& mScope;
    std::vector<FormulaOp>& mOps;
    int mDepth;
    int mNesting{0};
    size_t mPos{0};
    std::string mMessage;
};

int64_t floorDiv(int64_t a, int64_t b)
{
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0)))
    {
        --q;
    }
    return q;
}

} // namespace

char const* varName(Var v)
{
    int const index = static_cast<int>(v);
    return index >= 0 && index < kVarCount ? kVarNames[index] : "?";
}

bool Formula::isConstant() const
{
    for (auto const& op : ops)
    {
        if (op.code == FormulaOp::Code::kVar)
        {
            return false;
        }
    }
    return true;
}

bool compileFormula(std::string_view text, FormulaScope const& scope, Formula& out, std::string* error)
{
    out.ops.clear();
    out.text = std::string(text);
    Compiler compiler(text, scope, out.ops, 0);
    if (!compiler.run(error))
    {
        out.ops.clear();
        return false;
    }
    // Check the stack discipline once, so that evaluation only has to guard overflow.
    int depth = 0;
    for (auto const& op : out.ops)
    {
        switch (op.code)
        {
        case FormulaOp::Code::kConst:
        case FormulaOp::Code::kVar: ++depth; break;
        case FormulaOp::Code::kNeg: break;
        case FormulaOp::Code::kMin:
        case FormulaOp::Code::kMax: depth -= static_cast<int>(op.value) - 1; break;
        default: --depth; break;
        }
        if (depth <= 0 || depth > kMaxStack)
        {
            if (error != nullptr)
            {
                *error = "formula '" + std::string(text) + "': too complex";
            }
            out.ops.clear();
            return false;
        }
    }
    if (depth != 1)
    {
        if (error != nullptr)
        {
            *error = "formula '" + std::string(text) + "': malformed";
        }
        out.ops.clear();
        return false;
    }
    return true;
}

EvalStatus evalFormula(Formula const& formula, VarValues const& vars, int64_t& out) noexcept
{
    int64_t stack[kMaxStack];
    int top = 0;
    for (auto const& op : formula.ops)
    {
        switch (op.code)
        {
        case FormulaOp::Code::kConst:
            if (top >= kMaxStack)
            {
                return EvalStatus::kMalformed;
            }
            stack[top++] = op.value;
            break;
        case FormulaOp::Code::kVar:
            if (top >= kMaxStack || op.value < 0 || op.value >= kVarCount)
            {
                return EvalStatus::kMalformed;
            }
            stack[top++] = vars[op.value];
            break;
        case FormulaOp::Code::kNeg:
            if (top < 1)
            {
                return EvalStatus::kMalformed;
            }
            if (__builtin_sub_overflow(int64_t{0}, stack[top - 1], &stack[top - 1]))
            {
                return EvalStatus::kOverflow;
            }
            break;
        case FormulaOp::Code::kMin:
        case FormulaOp::Code::kMax:
        {
            int const n = static_cast<int>(op.value);
            if (n < 1 || top < n)
            {
                return EvalStatus::kMalformed;
            }
            int64_t best = stack[top - n];
            for (int i = top - n + 1; i < top; ++i)
            {
                bool const better = op.code == FormulaOp::Code::kMin ? stack[i] < best : stack[i] > best;
                best = better ? stack[i] : best;
            }
            top -= n;
            stack[top++] = best;
            break;
        }
        default:
        {
            if (top < 2)
            {
                return EvalStatus::kMalformed;
            }
            int64_t const b = stack[--top];
            int64_t const a = stack[top - 1];
            int64_t r = 0;
            switch (op.code)
            {
            case FormulaOp::Code::kAdd:
                if (__builtin_add_overflow(a, b, &r))
                {
                    return EvalStatus::kOverflow;
                }
                break;
            case FormulaOp::Code::kSub:
                if (__builtin_sub_overflow(a, b, &r))
                {
                    return EvalStatus::kOverflow;
                }
                break;
            case FormulaOp::Code::kMul:
                if (__builtin_mul_overflow(a, b, &r))
                {
                    return EvalStatus::kOverflow;
                }
                break;
            case FormulaOp::Code::kFloorDiv:
            case FormulaOp::Code::kMod:
                if (b == 0)
                {
                    return EvalStatus::kDivisionByZero;
                }
                if (a == INT64_MIN && b == -1)
                {
                    return EvalStatus::kOverflow;
                }
                if (op.code == FormulaOp::Code::kFloorDiv)
                {
                    r = floorDiv(a, b);
                }
                else // Python's a % b (the sign of b), without the overflow a - (a // b) * b can hit
                {
                    r = a % b;
                    if (r != 0 && (r < 0) != (b < 0))
                    {
                        r += b;
                    }
                }
                break;
            case FormulaOp::Code::kCdiv:
            {
                // Python's (a + b - 1) // b, written to avoid overflow in a + b - 1.
                if (b == 0)
                {
                    return EvalStatus::kDivisionByZero;
                }
                if (a == INT64_MIN || (a == -INT64_MAX && b == -1))
                {
                    return EvalStatus::kOverflow;
                }
                r = -floorDiv(-a, b);
                break;
            }
            default: return EvalStatus::kMalformed;
            }
            stack[top - 1] = r;
            break;
        }
        }
    }
    if (top != 1)
    {
        return EvalStatus::kMalformed;
    }
    out = stack[0];
    return EvalStatus::kOk;
}

char const* evalStatusName(EvalStatus status) noexcept
{
    switch (status)
    {
    case EvalStatus::kOk: return "ok";
    case EvalStatus::kOverflow: return "integer overflow";
    case EvalStatus::kDivisionByZero: return "division by zero";
    case EvalStatus::kMalformed: return "malformed formula";
    }
    return "?";
}

} // namespace ce_trt
